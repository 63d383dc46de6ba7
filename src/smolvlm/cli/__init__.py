"""The `smolvlm` command line (`python -m smolvlm.cli`, or the `smolvlm` script).

    main.py      the parser and `main()`: one line on stderr for bad input, never a traceback
    options.py   --model / --dtype / --quantize / --threads, shared by every command that runs a model
    generate.py  assemble.py  train.py  chat.py  caption.py  serve.py  bench.py  doctor.py: one command each
(`demo`, `ablate` and `eval` register theirs from smolvlm/demo.py, smolvlm/ablate.py and smolvlm/eval/.)
"""
