"""MiniMind: train a tiny Qwen3-style language model from scratch, end to end.

The package is flat on purpose: config -> model -> tokenizer -> chat -> generation -> checkpoint -> cli.
"""

__version__ = "0.1.0"


class MiniMindError(Exception):
    """A user-facing error: the CLI prints its message on one line, with no traceback."""
