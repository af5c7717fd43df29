"""The `minimind` subcommands: one module per command family, each with `add_parser(subparsers)` and its cmd_*
functions. minimind/cli.py lists them; nothing below this package imports it."""
