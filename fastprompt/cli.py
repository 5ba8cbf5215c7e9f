"""The `fastprompt` command."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from fastprompt.serve.cli import add_commands as add_serve_commands
from fastprompt.train.cli import add_commands as add_train_commands
from fastprompt.train.transfer_cli import add_commands as add_transfer_commands


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (options without help get one that is just the default),
    unless the help already states one or the default is None or False."""

    @staticmethod
    def _shows_default(action) -> bool:
        return bool(action.option_strings) and action.default is not None and action.default is not False \
            and action.default != argparse.SUPPRESS and "default" not in (action.help or "")

    def _format_action(self, action):
        if not action.help and self._shows_default(action):   # argparse prints no help line for these
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        return f"{action.help} (default: %(default)s)" if self._shows_default(action) else action.help


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows the defaults; its subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastprompt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="prompt-tune SmolLM2-135M on Rotten Tomatoes sentiment and print "
                                            "zero-shot vs tuned accuracy (offline, CPU, minutes)")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30; --tiny: 100)")
    demo.add_argument("--out", default=None, help="keep the tuned adapter(s), logs and data here")
    demo.add_argument("--tiny", action="store_true", help="instead, tune two soft prompts on a tiny built-in "
                                                          "model and serve them in one mixed batch (seconds)")
    demo.set_defaults(run=lambda args: __import__("fastprompt.demo", fromlist=["main"]).main(args))
    add_train_commands(commands)
    add_transfer_commands(commands)
    add_serve_commands(commands)
    return parser


def named_models() -> dict:
    """Model names that --model takes besides a folder, each with the function that returns its local folder
    (converted from a PyPI package on first use; see `fastprompt.offline`)."""
    from fastprompt.offline.smollm2 import smollm2_folder

    return {"smollm2": smollm2_folder}


def model_folder(name: str) -> str:
    """The local folder of ``--model name``: a named model (`named_models`) or a folder with a config.json;
    `UsageError` naming the argument otherwise."""
    from fastprompt.offline.packages import MissingPackageError
    from fastprompt.train.cli import UsageError

    models = named_models()
    if name in models:
        try:
            return str(models[name]())
        except MissingPackageError as error:
            raise UsageError(f"--model {name}: {error}") from None
    if not (Path(name) / "config.json").is_file():
        raise UsageError(f"--model {name!r} is neither a local model folder (no config.json in it) nor a named "
                         f"model ({', '.join(sorted(models))})")
    return name


def main(argv: list[str] | None = None) -> int:
    """Run a `fastprompt` command with --model resolved (`model_folder`); a `UsageError` (wrong model
    folder, malformed data, ...) prints one line and exits with code 2, as argparse does for a wrong flag."""
    from fastprompt.train.cli import UsageError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "model", None) is not None:
            args.model = model_folder(args.model)
        return args.run(args)
    except UsageError as error:
        parser.exit(2, f"fastprompt {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
