"""`python -m smolvlm.cli ...` (also what `torchrun -m smolvlm.cli train ...` runs): the `smolvlm` command."""

import sys

from smolvlm.cli.main import main

sys.exit(main())
