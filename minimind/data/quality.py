"""Row-level cleaning rules: PII scrub, C4 line rules, language by script, Gopher quality rules, SFT checks and
n-gram decontamination, with thresholds from clean.toml. `rules = load_rules("my.toml"); Rules.check_text(...)`."""

from __future__ import annotations

import csv
import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from minimind import MiniMindError
from minimind.data.dedup import CJK, ngram_hashes, normalize, token_hashes

DEFAULTS = Path(__file__).with_name("clean.toml")

Verdict = tuple[str, str] | None  # (rule, detail) for a row a rule removes, None for a row that passes


# ---------------------------------------------------------------------------------------------- settings


def _merge(base: dict, over: dict, where: str, path: str) -> dict:
    """`over` laid on `base`, refusing keys the defaults do not have and values of another type."""
    out = dict(base)
    for key, value in over.items():
        name = f"{where}.{key}" if where else key
        if key not in base:
            raise MiniMindError(f"{path}: unknown setting {name!r}; see {DEFAULTS} for the settings")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise MiniMindError(f"{path}: {name} must be a table")
            if key.endswith("_ngram_chars"):  # {n = share}: a new table replaces the default one
                if not all(k.isdigit() and isinstance(v, (int, float)) for k, v in value.items()):
                    raise MiniMindError(f"{path}: {name} must map n-gram sizes to shares, like {{ 5 = 0.15 }}")
                out[key] = value
            else:
                out[key] = _merge(base[key], value, name, path)
            continue
        expected = float if isinstance(base[key], float) else type(base[key])
        ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
        if not ok or isinstance(value, bool) != isinstance(base[key], bool):
            raise MiniMindError(f"{path}: {name} must be a {expected.__name__}, not {type(value).__name__}")
        out[key] = value
    return out


def load_rules(path: str | Path | None = None) -> dict:
    """The defaults of clean.toml with the settings of `path` (a TOML file with some of the same keys) on top."""
    with open(DEFAULTS, "rb") as f:
        rules = tomllib.load(f)
    if path is not None:
        try:
            with open(path, "rb") as f:
                rules = _merge(rules, tomllib.load(f), "", str(path))
        except FileNotFoundError:
            raise MiniMindError(f"{path}: no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise MiniMindError(f"{path}: invalid TOML: {e}") from None
    for table in ("top_ngram_chars", "dup_ngram_chars"):
        rules["gopher"][table] = {int(n): float(v) for n, v in rules["gopher"][table].items()}
    if rules["decontaminate"]["action"] not in ("drop", "flag"):
        raise MiniMindError(f"{path}: decontaminate.action must be \"drop\" or \"flag\"")
    unknown = set(rules["script"]["allowed"]) - set(SCRIPTS)
    if unknown:
        raise MiniMindError(f"{path}: script.allowed: unknown script {sorted(unknown)[0]!r}; "
                            f"expected some of {', '.join(SCRIPTS)}")
    return rules


# ---------------------------------------------------------------------------------------------- rewrites

_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
_PHONE = re.compile(r"(?<![\w+])(?:(?:\+?86[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}"  # mainland mobile
                    r"|\+\d{1,3}[- ]?\(?\d{1,4}\)?(?:[- ]?\d{2,4}){2,3}"  # +country ...
                    r"|\(\d{3}\) ?\d{3}-\d{4})(?!\d)")  # (123) 456-7890
_IP = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\.?\d)")


_DIGITS = re.compile(r"\d{3}")


def scrub_pii(text: str, pii: dict) -> tuple[str, int]:
    """Emails, phone numbers and IPv4 addresses replaced by placeholders; (text, replacements)."""
    total = 0
    if "@" in text:  # the cheap tests skip regexes that cannot match: most rows hold no PII
        text, total = _EMAIL.subn(pii["email"], text)
    if _DIGITS.search(text):
        for pattern, placeholder in ((_IP, pii["ip"]), (_PHONE, pii["phone"])):
            text, n = pattern.subn(placeholder, text)
            total += n
    return text, total


def drop_boilerplate(text: str, c4: dict) -> tuple[str, int]:
    """C4's line rule: lines naming javascript, cookies, terms of use (the `boilerplate` phrases) dropped;
    (text, lines dropped)."""
    lower = text.lower()
    if not any(p in lower for p in c4["boilerplate"]):
        return text, 0
    lines = text.split("\n")
    kept = [line for line in lines if not any(p in line.lower() for p in c4["boilerplate"])]
    return "\n".join(kept).strip(), len(lines) - len(kept)


# ---------------------------------------------------------------------------------------------- text rules

SCRIPTS = {
    "han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff", "kana": "\u3040-\u30ff", "hangul": "\uac00-\ud7af\u1100-\u11ff",
    "latin": "A-Za-z\u00c0-\u024f", "cyrillic": "\u0400-\u04ff", "arabic": "\u0600-\u06ff",
    "greek": "\u0370-\u03ff", "devanagari": "\u0900-\u097f", "thai": "\u0e00-\u0e7f", "hebrew": "\u0590-\u05ff",
}
_SCRIPT_RE = {name: re.compile(f"[{chars}]") for name, chars in SCRIPTS.items()}
_LETTER = re.compile(r"[^\W\d_]")
_WORD = re.compile(rf"[{CJK}]|[^\s{CJK}]+")  # Gopher's words: whitespace-separated, CJK characters one each
_CJK_CHAR = re.compile(f"[{CJK}]")
_OTHER_WORD = re.compile(rf"[^\s{CJK}]+")
_ALPHA_WORD = re.compile(rf"[^\s{CJK}]*?[^\W\d_{CJK}][^\s{CJK}]*")  # a non-CJK word with a letter in it
_WORD_PUNCT = re.compile(r"[.,;:!?\"'()\[\]]")
_BULLETS = ("•", "●", "◦", "▪", "‣", "-", "*", "·", "–", "○", "■")
_TERMINAL = tuple('.!?"\'”’」』。！？…')
_PARAGRAPHS = re.compile(r"\n\s*\n")
STOP_WORDS = {"latin": frozenset({"the", "be", "to", "of", "and", "that", "have", "with", "is", "in", "a"}),
              "cjk": frozenset("的了是在和有与对为这那我你他她们也就都而及将被把从向到以于之其所不很没还吗呢啊吧")}


def script_verdict(text: str, rules: dict) -> Verdict:
    """Remove text whose letters are mostly in scripts outside `allowed`."""
    if text.isascii() and "latin" in rules["allowed"]:
        return None
    letters = len(_LETTER.findall(text))
    if not letters:
        return None
    share = len(_allowed(tuple(rules["allowed"])).findall(text)) / letters
    if share >= rules["min_ratio"]:
        return None
    top = max(_SCRIPT_RE, key=lambda name: len(_SCRIPT_RE[name].findall(text)))
    return "script", f"{share:.0%} of letters in {'/'.join(rules['allowed'])}; mostly {top}"


@functools.cache
def _allowed(scripts: tuple[str, ...]) -> re.Pattern:
    return re.compile("[" + "".join(SCRIPTS[s] for s in scripts) + "]")


def c4_verdict(text: str, rules: dict) -> Verdict:
    """C4's document rules: placeholder text, curly brackets (off by default), too few lines that end a sentence."""
    lower = text.lower()
    if rules["lorem_ipsum"] and "lorem ipsum" in lower:
        return "c4-lorem-ipsum", "contains lorem ipsum"
    if rules["curly_bracket"] and "{" in text:
        return "c4-curly-bracket", "contains {"
    lines = [line.rstrip() for line in text.split("\n") if line.strip()]
    if not lines:
        return "c4-boilerplate", "nothing left after dropping boilerplate lines"
    if len(lines) < rules["min_lines"]:
        return None
    ended = sum(line.endswith(_TERMINAL) for line in lines) / len(lines)
    if ended < rules["min_punct_lines"]:
        return "c4-punctuation", f"{ended:.0%} of {len(lines)} lines end a sentence"
    return None


def _repeated_share(parts: list[str]) -> tuple[float, float]:
    """(share of parts that repeat an earlier one, share of characters in them)."""
    seen: set[str] = set()
    dup = dup_chars = 0
    for p in parts:
        if p in seen:
            dup += 1
            dup_chars += len(p)
        seen.add(p)
    total = sum(map(len, parts)) or 1
    return dup / len(parts), dup_chars / total


def gopher_verdict(text: str, toks: list[str], hashes: np.ndarray, rules: dict) -> Verdict:
    """Gopher's quality and repetition rules on a document; `toks`/`hashes` are its dedup.normalize() tokens and
    their token_hashes(), shared with deduplication."""
    n = len(_WORD.findall(text))
    if not rules["min_words"] <= n <= rules["max_words"]:
        return "gopher-words", f"{n} words"
    cjk = len(_CJK_CHAR.findall(text))
    other = _OTHER_WORD.findall(text)  # words that are not single CJK characters
    if len(other) * 2 >= n:
        mean = (sum(map(len, other)) - len(_WORD_PUNCT.findall(text))) / len(other)
        if not rules["min_mean_word_length"] <= mean <= rules["max_mean_word_length"]:
            return "gopher-word-length", f"mean word length {mean:.1f}"
    symbols = (text.count("#") + text.count("...") + text.count("…")) / n
    if symbols > rules["max_symbol_word_ratio"]:
        return "gopher-symbols", f"{symbols:.2f} symbols per word"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) >= rules["min_lines"]:
        bullets = sum(line.startswith(_BULLETS) for line in lines) / len(lines)
        if bullets > rules["max_bullet_lines"]:
            return "gopher-bullets", f"{bullets:.0%} of lines are bullets"
        ellipsis = sum(line.endswith(("...", "…")) for line in lines) / len(lines)
        if ellipsis > rules["max_ellipsis_lines"]:
            return "gopher-ellipsis", f"{ellipsis:.0%} of lines end in an ellipsis"
    alpha = (cjk + len(_ALPHA_WORD.findall(text))) / n
    if alpha < rules["min_alpha_words"]:
        return "gopher-alpha", f"{alpha:.0%} of words have a letter"
    script = "cjk" if cjk * 2 >= n else "latin"
    found = sum(1 for t in toks if t in STOP_WORDS[script])
    if found < rules["min_stop_words_cjk" if script == "cjk" else "min_stop_words"]:
        return "gopher-stop-words", f"{found} stop words"
    if n < rules["repetition_min_words"] * (rules["cjk_ngram_scale"] if script == "cjk" else 1):
        return None
    share, chars = _repeated_share(lines)
    if share > rules["max_dup_lines"] or chars > rules["max_dup_line_chars"]:
        return "gopher-dup-lines", f"{share:.0%} of lines ({chars:.0%} of characters) repeated"
    paragraphs = [p.strip() for p in _PARAGRAPHS.split(text) if p.strip()]
    share, chars = _repeated_share(paragraphs)
    if share > rules["max_dup_paragraphs"] or chars > rules["max_dup_paragraph_chars"]:
        return "gopher-dup-paragraphs", f"{share:.0%} of paragraphs ({chars:.0%} of characters) repeated"
    return _ngram_verdict(toks, hashes, rules, cjk * 2 >= n)


def _ngram_verdict(toks: list[str], hashes: np.ndarray, rules: dict, cjk: bool) -> Verdict:
    """Gopher's n-gram repetition: the most frequent short n-gram, and repeated longer n-grams, as shares of the
    characters."""
    lens = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
    total = int(lens.sum())
    if not total:
        return None
    scale = rules["cjk_ngram_scale"] if cjk else 1
    cum = np.concatenate([[0], np.cumsum(lens)])
    for n, limit in rules["top_ngram_chars"].items():
        n *= scale
        if len(toks) <= n:
            break
        grams = np.sort(ngram_hashes(hashes, n))
        starts = np.flatnonzero(np.concatenate([[True], grams[1:] != grams[:-1], [True]]))
        runs = np.diff(starts)
        top = int(np.argmax(runs))
        if runs[top] > 1:
            at = int(np.flatnonzero(ngram_hashes(hashes, n) == grams[starts[top]])[0])
            share = runs[top] * int(cum[at + n] - cum[at]) / total
            if share > limit:
                return "gopher-top-ngram", f"the most frequent {n}-gram covers {share:.0%} of characters"
    for n, limit in rules["dup_ngram_chars"].items():
        n *= scale
        if len(toks) <= n:
            break
        grams = ngram_hashes(hashes, n)
        order = np.argsort(grams, kind="stable")  # stable: each n-gram's first occurrence comes first
        ordered = grams[order]
        repeats = order[1:][ordered[1:] == ordered[:-1]]  # every occurrence after the first
        if not len(repeats):
            break  # no repeated n-gram: no repeated longer one either
        cover = np.zeros(len(toks) + 1, dtype=np.int64)
        np.add.at(cover, repeats, 1)
        np.add.at(cover, repeats + n, -1)
        share = int(lens[np.cumsum(cover)[:-1] > 0].sum()) / total
        if share > limit:
            return "gopher-dup-ngrams", f"repeated {n}-grams cover {share:.0%} of characters"
    return None


# ---------------------------------------------------------------------------------------------- SFT rows

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _tool_calls_ok(calls: Any) -> str | None:
    """Why a message's tool_calls (MiniMind's JSON string or OpenAI objects) do not parse, or None."""
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError as e:
            return f"tool_calls is not valid JSON ({e.msg} at column {e.colno})"
    for call in calls if isinstance(calls, list) else [calls]:
        args = (call.get("function") or call).get("arguments") if isinstance(call, dict) else None
        if isinstance(args, str):
            try:
                json.loads(args)
            except json.JSONDecodeError as e:
                return f"tool call arguments are not valid JSON ({e.msg})"
    return None


def sft_verdict(messages: list, rules: dict, n_tokens: int | None) -> Verdict:
    """Empty assistant turns, tool calls whose JSON does not parse, unclosed <think> blocks, conversations over
    the token (or character) budget. `n_tokens`: the rendered conversation's length, when a tokenizer is given."""
    chars = 0
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        content = content if isinstance(content, str) else ""
        chars += len(content)
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        reasoning = m.get("reasoning_content") if isinstance(m.get("reasoning_content"), str) else ""
        if not (content.strip() or reasoning.strip() or m.get("tool_calls")):
            return "sft-empty-assistant", f"message {i} is an empty assistant turn"
        if m.get("tool_calls"):
            problem = _tool_calls_ok(m["tool_calls"])
            if problem:
                return "sft-bad-tool-call", f"message {i}: {problem}"
        for body in _TOOL_CALL.findall(content):
            try:
                json.loads(body)
            except json.JSONDecodeError as e:
                return "sft-bad-tool-call", f"message {i}: <tool_call> is not valid JSON ({e.msg})"
        if content.count("<think>") != content.count("</think>"):
            return "sft-unclosed-think", f"message {i}: <think> without </think>"
    if n_tokens is not None and n_tokens > rules["max_tokens"]:
        return "sft-too-long", f"{n_tokens} tokens > {rules['max_tokens']}"
    if n_tokens is None and rules["max_chars"] and chars > rules["max_chars"]:
        return "sft-too-long", f"{chars} characters > {rules['max_chars']}"
    return None


# ---------------------------------------------------------------------------------------------- decontamination


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, v in value.items():
            if key != "role":
                yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def eval_items(path: Path) -> Iterator[str]:
    """Every text of an evaluation file: string fields of JSONL rows, CSV cells, Parquet cells, .txt paragraphs."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            text = f.read()
        try:
            rows = [json.loads(text)] if suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        except json.JSONDecodeError as e:
            raise MiniMindError(f"{path}: invalid JSON: {e}") from None
        for row in rows:
            yield from _strings(row)
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            for row in csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","):
                yield from row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from _strings(pq.read_table(path).to_pylist())
    else:
        yield from _PARAGRAPHS.split(path.read_text(encoding="utf-8"))


@dataclass
class NgramIndex:
    """The n-grams of evaluation files, sorted, each with the file it came from."""

    n: int
    hashes: np.ndarray
    source: np.ndarray
    files: list[str]
    items: int = 0
    short_items: int = 0  # items with fewer than n tokens: no n-gram to look for

    @classmethod
    def build(cls, paths: list[str | Path], n: int) -> NgramIndex:
        parts, sources, items, short = [], [], 0, 0
        for i, path in enumerate(map(Path, paths)):
            if not path.is_file():
                raise MiniMindError(f"{path}: no such evaluation file")
            for text in eval_items(path):
                toks = normalize(text)
                if not toks:
                    continue
                items += 1
                if len(toks) < n:
                    short += 1
                    continue
                parts.append(ngram_hashes(token_hashes(toks), n))
                sources.append(np.full(len(parts[-1]), i, dtype=np.int32))
        hashes = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
        source = np.concatenate(sources) if sources else np.zeros(0, np.int32)
        order = np.argsort(hashes, kind="stable")
        return cls(n, hashes[order], source[order], [str(p) for p in paths], items, short)

    def match(self, hashes: np.ndarray) -> str | None:
        """The evaluation file that shares an n-gram with a text (given its token_hashes()), or None."""
        if len(hashes) < self.n or not len(self.hashes):
            return None
        grams = ngram_hashes(hashes, self.n)
        at = np.minimum(np.searchsorted(self.hashes, grams), len(self.hashes) - 1)
        hit = np.flatnonzero(self.hashes[at] == grams)
        return self.files[self.source[at[hit[0]]]] if len(hit) else None
