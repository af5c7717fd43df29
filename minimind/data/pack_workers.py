"""The machinery behind minimind.data.pack.pack(): a pool of spawned processes tokenizes byte ranges of the source
into shard files, which `build(plan, ...)` merges into the cache directory PackedDataset reads; PackStats counts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import tempfile
import time
import unicodedata
from bisect import bisect_right
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from minimind import MiniMindError
from minimind.chat import EMPTY_THINK, IM_END, IM_START, encode_chat
from minimind.data.formats import BadLine, decode_line, iter_rows, parse_row
from minimind.data.parallel import byte_ranges, cpus, ordered_map

BOS, EOS = IM_START, IM_END  # MiniMind's document delimiters (ids 1 and 2); from chat.py, which workers load fast
FORMAT_VERSION = 1  # bump when the files or their meaning change: old caches then miss instead of misreading
MAX_CHUNK_BYTES = 16 << 20  # per job: bounds a worker's memory whatever the file size
FLUSH_TOKENS = 1 << 20  # a worker writes its shard in pieces of about this many tokens
ENCODE_BATCH_CHARS = 1 << 20  # pretrain texts handed to encode_batch at once
PIECE_CHARS = 1 << 16  # an SFT row's text is tokenized in pieces of about this many characters
KEPT_BAD_LINES = 20  # bad lines remembered in meta.json (all are counted)
SKIP_HINT = "(use --skip-bad to skip bad lines)"

# MiniMind adds one of these (half English, half Chinese) to some conversations without tools, so the model
# learns to follow a system prompt without depending on one.
SYSTEM_PROMPTS = (
    "You are MiniMind, a small but useful language model.",
    "You are a helpful assistant. Answer clearly and briefly.",
    "You are MiniMind, an AI assistant. Think carefully and answer honestly.",
    "You are a friendly assistant who explains things simply.",
    "You are a knowledgeable assistant; when you are not sure, say so.",
    "你是MiniMind，一个小巧但有用的语言模型。",
    "你是一个乐于助人的AI助手，请清晰简洁地回答问题。",
    "你是MiniMind，请认真思考后如实回答。",
    "你是一个友好的助手，善于用简单的语言解释问题。",
    "你是一个知识丰富的助手，不确定时请坦诚说明。",
)


@dataclass
class PackStats:
    """What packing did. Tokens that are not in any row (a pretrain tail, SFT truncation) are counted, not lost
    silently: `tokens + dropped_tokens` is everything the documents tokenized to."""

    documents: int = 0  # valid documents / conversations read
    rows: int = 0
    tokens: int = 0  # tokens stored in rows
    truncated: int = 0  # SFT conversations longer than seq_len, cut to it
    skipped_bad: int = 0
    loss_tokens: int = 0  # tokens with mask 1 (all tokens for pretrain)
    dropped_tokens: int = 0  # pretrain: the final partial row; SFT: the truncated tails
    longest: int = 0  # the longest document / conversation in tokens, before any cut
    no_loss_rows: int = 0  # SFT rows with no assistant token left (e.g. truncated before the answer)
    source_bytes: int = 0
    seconds: float = 0.0  # time to build (0 when read from the cache)

    def summary(self) -> str:
        """One line for logs: rows, tokens, and every kind of loss spelt out."""
        parts = [f"{self.documents:,} documents -> {self.rows:,} rows, {self.tokens:,} tokens "
                 f"({self.loss_tokens:,} with loss), longest {self.longest:,}"]
        if self.truncated:
            parts.append(f"{self.truncated:,} truncated")
        if self.dropped_tokens:
            parts.append(f"{self.dropped_tokens:,} tokens dropped")
        if self.no_loss_rows:
            parts.append(f"{self.no_loss_rows:,} rows without loss")
        if self.skipped_bad:
            parts.append(f"{self.skipped_bad:,} bad lines skipped")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs besides its byte range; pickled once per worker process."""

    source: str
    kind: str
    seq_len: int
    tokenizer_json: str
    shard_dir: str
    text: bool  # a .txt source: documents span lines, so it is read whole by formats.iter_rows
    skip_bad: bool
    seed: int
    system_prompt_prob: float
    keep_empty_think_prob: float
    newline_loss: bool = False  # SFT: the "\n" after each assistant <|im_end|> carries loss too (MiniMind's mask)


class _Job(NamedTuple):
    number: int
    start: int  # byte range [start, end), cut just after a newline
    end: int


@dataclass
class _Result:
    number: int
    nbytes: int
    lines: int  # newlines in the range, so the parent can turn local line numbers into file line numbers
    stats: PackStats
    bad: list[tuple[int, str]] = field(default_factory=list)  # (local line, problem)
    lengths: np.ndarray | None = None  # SFT row lengths


class _Encoding(NamedTuple):
    ids: list[int]
    offsets: list[tuple[int, int]]


def _spans(text: str, specials: list[str]) -> Iterator[tuple[int, int]]:
    """[start, end) pieces of about PIECE_CHARS covering the text, cut only where a letter or digit meets a
    character of another class outside a special token: byte-level BPE pre-tokenizers (GPT-2's, Qwen's,
    MiniMind's) split there anyway, so the pieces tokenize to exactly the whole text's tokens. A text with
    no such place is one piece."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        for p in range(start + PIECE_CHARS, len(text)):
            kind = unicodedata.category(text[p - 1])[0]
            if kind in "LN" and unicodedata.category(text[p])[0] != kind \
                    and not any(text.find(s, p - len(s) + 1, p + len(s) - 1) >= 0 for s in specials):
                break
        else:
            break
        yield start, p
        start = p
    yield start, len(text)


class _RowEncoder:
    """The tokenizer view an SFT row is encoded through: it keeps the first `limit` tokens (with offsets) and
    only counts the rest, so a row's memory is bounded by seq_len, not by its line (the text is tokenized in
    the pieces of _spans). With drop_think, every empty think block is deleted from the text first (as
    MiniMind does to 80% of its SFT samples) and offsets are reported in the original text; encode_chat's
    character spans then still mark the right tokens, as the blocks lie inside assistant spans."""

    def __init__(self, tokenizer: Tokenizer, limit: int, specials: list[str]):
        self.tokenizer, self.limit, self.specials = tokenizer, limit, specials
        self.drop_think = False
        self.start_row()

    def start_row(self) -> None:
        """A new row: encode_chat may call encode several times for one row (text around a special token that a
        message holds is encoded in pieces), so the limit and the count run over the whole row."""
        self.count = 0  # tokens the row's text gave in all, kept or not
        self.kept = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> _Encoding:
        pieces = text.split(EMPTY_THINK) if self.drop_think else [text]
        kept_starts, pos = [], 0  # where piece i starts in the kept text; it starts i blocks later originally
        for piece in pieces:
            kept_starts.append(pos)
            pos += len(piece)
        kept = "".join(pieces)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for start, end in _spans(kept, self.specials):
            enc = self.tokenizer.encode(kept[start:end], add_special_tokens=add_special_tokens)
            room = self.limit - self.kept
            if room > 0:
                ids += enc.ids[:room]
                offsets += [(s + start, e + start) for s, e in enc.offsets[:room]] if start else enc.offsets[:room]
                self.kept += min(room, len(enc.ids))
            self.count += len(enc.ids)
        if self.drop_think:
            width = len(EMPTY_THINK)

            def original(p: int) -> int:
                return p + (bisect_right(kept_starts, p) - 1) * width

            offsets = [(original(s), original(e - 1) + 1 if e > s else original(s)) for s, e in offsets]
        return _Encoding(ids, offsets)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[_Encoding]:
        return [self.encode(t, add_special_tokens) for t in texts]


class _Packer:
    """Tokenizes one job into shard files: `<number>.ids` (uint16), and `<number>.mask` (uint8) for SFT."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.tokenizer = Tokenizer.from_str(plan.tokenizer_json)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.bos, self.eos = self.tokenizer.token_to_id(BOS), self.tokenizer.token_to_id(EOS)
        self.specials = [t["content"] for t in json.loads(plan.tokenizer_json).get("added_tokens", [])]
        self.row_encoder = _RowEncoder(self.tokenizer, plan.seq_len, self.specials)
        self.doc_tokens = 0  # pretrain: tokens so far of the document whose pieces are being encoded

    def _items(self, job: _Job, result: _Result) -> Iterator[tuple[int, int, dict | ValueError]]:
        """(local line, byte offset, normalised row or the problem) for each non-blank line of the range."""
        plan = self.plan
        if plan.text:
            bad: list[BadLine] = []
            for line, row in iter_rows(plan.source, plan.kind, bad):
                yield from ((b.line, 0, ValueError(b.problem)) for b in bad)
                bad.clear()
                yield line, 0, row
            yield from ((b.line, 0, ValueError(b.problem)) for b in bad)
            return
        with open(plan.source, "rb") as fh:
            fh.seek(job.start)
            data = fh.read(job.end - job.start)
        result.lines = data.count(b"\n")
        offset = job.start
        for local, raw in enumerate(data.split(b"\n"), 1):
            line_offset, offset = offset, offset + len(raw) + 1
            if line_offset == 0:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark, as formats.read_lines allows
            if not raw.strip():
                continue
            try:
                yield local, line_offset, parse_row(decode_line(raw), plan.kind)
            except ValueError as e:
                yield local, line_offset, e

    def __call__(self, job: _Job) -> _Result:
        plan = self.plan
        result = _Result(job.number, job.end - job.start, 0, PackStats())
        shard = Path(plan.shard_dir) / f"{job.number:06d}"
        sft = plan.kind == "sft"
        ids: list[int] = []
        mask: list[int] = []
        texts: list[tuple[str, bool, bool]] = []  # pretrain pieces: (text, first of its document, last)
        lengths: list[int] = []
        stats = result.stats
        pending_chars = 0  # pretrain text waiting for encode_batch
        with open(shard.with_suffix(".ids"), "wb") as ids_out, \
                (open(shard.with_suffix(".mask"), "wb") if sft else open(os.devnull, "wb")) as mask_out:

            def flush() -> None:
                nonlocal pending_chars
                self._encode_texts(texts, ids, stats)
                texts.clear()
                pending_chars = 0
                np.array(ids, dtype=np.uint16).tofile(ids_out)
                ids.clear()
                np.array(mask, dtype=np.uint8).tofile(mask_out)
                mask.clear()

            for local, offset, row in self._items(job, result):
                if isinstance(row, ValueError):
                    result.bad.append((local, str(row)))
                    if not plan.skip_bad:  # the parent will raise on it: stop early
                        break
                    continue
                stats.documents += 1
                if sft:
                    lengths.append(self._add_conversation(row, offset, ids, mask, stats))
                else:  # a long document goes in pieces, so its tokens never sit in memory all at once
                    text = row["text"]
                    for start, end in _spans(text, self.specials):
                        texts.append((text[start:end], start == 0, end == len(text)))
                        pending_chars += end - start
                        if pending_chars >= ENCODE_BATCH_CHARS:
                            flush()
                if len(ids) >= FLUSH_TOKENS:
                    flush()
            flush()
        if sft:
            result.lengths = np.array(lengths, dtype=np.int64)
        return result

    def _encode_texts(self, texts: list[tuple[str, bool, bool]], ids: list[int], stats: PackStats) -> None:
        """Pretrain: each document as [bos] + ids + [eos], appended to the running stream, from its pieces."""
        if not texts:
            return
        encodings = self.tokenizer.encode_batch_fast([text for text, _, _ in texts], add_special_tokens=False)
        for (_, first, last), enc in zip(texts, encodings):
            if first:
                ids.append(self.bos)
                self.doc_tokens = 0
            ids.extend(enc.ids)
            self.doc_tokens += len(enc.ids)
            if last:
                ids.append(self.eos)
                stats.longest = max(stats.longest, self.doc_tokens + 2)

    def _add_conversation(self, row: dict, offset: int, ids: list[int], mask: list[int], stats: PackStats) -> int:
        """SFT: one conversation (augmented as MiniMind does) as one row, truncated to seq_len; its length."""
        plan = self.plan
        messages, tools = row["messages"], row["tools"]
        encoder = self.row_encoder
        encoder.start_row()
        encoder.drop_think = False
        if plan.system_prompt_prob > 0 or plan.keep_empty_think_prob < 1:
            # Seeded by the line's byte offset: the same draw whatever the chunking or the worker count.
            rng = random.Random(f"{plan.seed}:{offset}")
            add_system, prompt, keep_think = rng.random(), rng.choice(SYSTEM_PROMPTS), rng.random()
            if add_system < plan.system_prompt_prob and not tools and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": prompt}, *messages]
            encoder.drop_think = keep_think >= plan.keep_empty_think_prob
        row_ids, row_mask = encode_chat(encoder, messages, tools,  # at most seq_len tokens
                                        newline_loss=plan.newline_loss)
        n = encoder.count
        stats.longest = max(stats.longest, n)
        if n > plan.seq_len:
            stats.truncated += 1
            stats.dropped_tokens += n - plan.seq_len
        kept_loss = sum(row_mask)
        stats.loss_tokens += kept_loss
        stats.no_loss_rows += kept_loss == 0
        ids.extend(row_ids)
        mask.extend(row_mask)
        return len(row_ids)


def _add_stats(total: PackStats, part: PackStats) -> None:
    for f in fields(PackStats):
        a, b = getattr(total, f.name), getattr(part, f.name)
        setattr(total, f.name, max(a, b) if f.name == "longest" else a + b)


def _remove_abandoned(final: Path) -> None:
    """Delete temporary builds of `final` left by killed processes of this host (an OOM kill skips `finally`)."""
    host = socket.gethostname()
    for tmp in final.parent.glob(f".tmp-{final.name}-*"):
        head, pid, _ = tmp.name.rsplit("-", 2)  # mkdtemp's random tail has no '-'
        if head.endswith(f"-{host}") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def build(plan: Plan, identity: dict, key: str, final: Path, workers: int | None, chunk_bytes: int | None,
          progress: bool) -> None:
    """Pack into a temporary directory beside `final` and rename it into place: a crash leaves no directory
    that looks like a finished cache (`identity` and `key` go into its meta.json)."""
    started = time.perf_counter()
    _remove_abandoned(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}-", dir=final.parent))
    try:
        shards = tmp / "shards"
        shards.mkdir()
        plan = replace(plan, shard_dir=str(shards))
        source = Path(plan.source)
        size = identity["size"]
        workers = max(1, workers or cpus())
        if plan.text:
            jobs = [_Job(0, 0, size)]
        else:
            chunk = chunk_bytes or min(MAX_CHUNK_BYTES, max(1 << 20, -(-size // (workers * 4))))
            jobs = [_Job(i, a, b) for i, (a, b) in enumerate(byte_ranges(source, size, chunk))]
        workers = min(workers, len(jobs))
        stats = PackStats(source_bytes=size)
        bad_lines: list[str] = []
        lengths: list[np.ndarray] = []
        lines_before = 0
        with open(tmp / "ids.bin", "wb") as ids_out, \
                open(tmp / "mask.bin", "wb") as mask_out, \
                tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"packing {source.name}",
                     disable=not progress) as bar, \
                closing(ordered_map(_Packer, plan, jobs, workers, f"packing {source}")) as results:
            for result in results:
                for local, problem in result.bad:
                    bad = BadLine(str(source), lines_before + local, problem)
                    if len(bad_lines) < KEPT_BAD_LINES:
                        bad_lines.append(str(bad))
                    if not plan.skip_bad:
                        raise MiniMindError(f"{bad} {SKIP_HINT}")
                    stats.skipped_bad += 1
                lines_before += result.lines
                shard = shards / f"{result.number:06d}"
                for suffix, out in ((".ids", ids_out), (".mask", mask_out)):
                    if shard.with_suffix(suffix).exists():
                        with open(shard.with_suffix(suffix), "rb") as fh:
                            shutil.copyfileobj(fh, out)
                        shard.with_suffix(suffix).unlink()
                _add_stats(stats, result.stats)
                if result.lengths is not None:
                    lengths.append(result.lengths)
                bar.update(result.nbytes)
            stored = ids_out.tell() // 2
            if plan.kind == "pretrain":
                stats.rows = stored // plan.seq_len
                stats.tokens = stats.loss_tokens = stats.rows * plan.seq_len
                stats.dropped_tokens = stored - stats.tokens
                ids_out.truncate(stats.tokens * 2)
                index = np.arange(stats.rows + 1, dtype=np.int64) * plan.seq_len
            else:
                index = np.concatenate([np.zeros(1, np.int64), *lengths]).cumsum()
                stats.rows, stats.tokens = len(index) - 1, stored
        st = source.stat()
        if (st.st_size, st.st_mtime_ns) != (identity["size"], identity["mtime_ns"]):
            raise MiniMindError(f"{source}: the file changed while it was being packed; pack it again")
        if plan.kind == "pretrain":
            (tmp / "mask.bin").unlink()
        shards.rmdir()
        np.save(tmp / "index.npy", index)
        stats.seconds = round(time.perf_counter() - started, 3)
        meta = {"format": FORMAT_VERSION, "kind": plan.kind, "seq_len": plan.seq_len, "stats": asdict(stats),
                "bad_lines": bad_lines, "key": key, "identity": identity}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process building the same cache
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
