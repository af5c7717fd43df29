"""MiniMind: train a tiny Qwen3-style language model from scratch, end to end.

Layers, bottom to top: the core (config, model, tokenizer, chat, generation, ...), data, rl, train, eval,
serve and export, recipes, commands (the `minimind` CLI). tests/test_layers.py holds every import to that order.
"""

__version__ = "0.1.0"


class MiniMindError(Exception):
    """A user-facing error: the CLI prints its message on one line, with no traceback."""
