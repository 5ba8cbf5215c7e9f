"""The `fastprompt` command."""

from __future__ import annotations

import argparse
import sys

from fastprompt.serve.cli import add_commands as add_serve_commands
from fastprompt.train.cli import add_commands as add_train_commands
from fastprompt.train.transfer_cli import add_commands as add_transfer_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastprompt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="prompt-tune SmolLM2-135M on Rotten Tomatoes sentiment and print "
                                            "zero-shot vs tuned accuracy (offline, CPU, minutes)")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30; --tiny: 100)")
    demo.add_argument("--out", default=None, help="keep the tuned adapter, logs and data here")
    demo.add_argument("--tiny", action="store_true", help="instead, tune two soft prompts on a tiny built-in "
                                                          "model and serve them in one mixed batch (seconds)")
    demo.set_defaults(run=lambda args: __import__("fastprompt.demo", fromlist=["main"]).main(args))
    add_train_commands(commands)
    add_transfer_commands(commands)
    add_serve_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
