"""The `smolvlm` command line: the parser and `main()`. Problems with the user's input (SmolVLMError) end the
program with one line on stderr and a non-zero exit code, never a traceback."""

import argparse
import importlib
import sys

from smolvlm.errors import SmolVLMError

EXIT_USAGE = 2

# The sub-commands, in `smolvlm --help` order. Each module has `add_parser(subparsers)`, which registers its
# sub-command with `set_defaults(func=...)`, and keeps heavy imports inside its functions (`--help` needs no torch).
COMMAND_MODULES: list[str] = [
    "smolvlm.cli.generate", "smolvlm.cli.assemble", "smolvlm.cli.train", "smolvlm.demo", "smolvlm.cli.doctor",
    "smolvlm.cli.serve", "smolvlm.cli.caption", "smolvlm.cli.chat", "smolvlm.eval.score", "smolvlm.eval.cli",
    "smolvlm.cli.bench", "smolvlm.ablate",
]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smolvlm", description="Build, train, evaluate, compress and serve small vision-language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except SmolVLMError as e:
        print(f"smolvlm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
