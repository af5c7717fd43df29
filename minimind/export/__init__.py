"""Exporters from a model directory to other runtimes: GGUF for llama.cpp (`gguf.py`) and Ollama (`ollama.py`).
`minimind export gguf --model DIR --out F.gguf`; `minimind export ollama --model DIR --out DIR`."""

from minimind.export.gguf import GGUF_TYPES, export_gguf, read_gguf
from minimind.export.ollama import export_ollama

__all__ = ["GGUF_TYPES", "export_gguf", "export_ollama", "read_gguf"]
