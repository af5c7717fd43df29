"""The `minimind` command: one entry point for the whole life cycle, a dispatch table over minimind/commands/.
`minimind --help`, then `minimind <command> --help` for each command's flags."""

from __future__ import annotations

import argparse
import logging
import sys

from minimind import MiniMindError, __version__
from minimind.commands import chat, data, demo, export, lora, serve, tokenizer, train
from minimind.commands import eval as evaluate  # not `eval`: that name is a builtin

# In the order `minimind --help` lists them; each module adds its subcommands with add_parser(subparsers).
COMMANDS = (demo, data, tokenizer, train, chat, evaluate, serve, export, lora)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minimind", description="Train, chat with and ship a tiny LLM.")
    parser.add_argument("--version", action="version", version=f"minimind {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides"):  # only `train` takes free --key value settings
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    if getattr(args, "compile", False):  # say on stderr what the first tokens wait for (compile times)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("minimind: %(message)s"))
        logging.getLogger("minimind.generation").addHandler(handler)
        logging.getLogger("minimind.generation").setLevel(logging.INFO)
    try:
        args.func(args)
    except MiniMindError as e:
        print(f"minimind: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0
