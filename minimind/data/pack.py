"""Tokenize-and-pack: a pretrain or SFT file (any size, streamed in byte ranges, tokenized in parallel) becomes
uint16 memmap rows in a cache directory. `ds = pack("sft.jsonl", tok, "sft", 768); ids, mask = ds[0]`.

The public side (pack, PackedDataset, PackStats); the worker processes and cache writing are in pack_workers.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from minimind import MiniMindError
from minimind.data.formats import TEXT_SUFFIXES
from minimind.data.pack_workers import BOS, EOS, FORMAT_VERSION, SKIP_HINT, PackStats, Plan, build

PACK_KINDS = ("pretrain", "sft")  # DPO and RL rows are small; their stages read them with iter_rows

# ---------------------------------------------------------------------------------------------- read side


def _map(path: Path, dtype: Any) -> np.ndarray:
    # numpy refuses to map an empty file, and an SFT file of zero rows is legal
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class PackedDataset:
    """Packed rows, memory-mapped: opening costs a few syscalls, so every DDP rank and dataloader worker opens
    its own. `ids, mask = ds[i]`: ids as int64, mask as uint8 (None for pretrain, where every token counts).
    Pretrain rows are exactly seq_len long; SFT rows at most seq_len, unpadded (the collate function pads)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            self.stats = PackStats(**meta["stats"])
            self.kind: str = meta["kind"]
            self.seq_len: int = meta["seq_len"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MiniMindError(f"{meta_file}: not a packed dataset ({type(e).__name__}: {e})") from None
        if meta.get("format") != FORMAT_VERSION:
            raise MiniMindError(f"{meta_file}: packed with format {meta.get('format')}, this version reads "
                                f"{FORMAT_VERSION}; pack the data again")
        self.meta = meta
        self._open()

    def _open(self) -> None:
        self._ids = _map(self.path / "ids.bin", np.uint16)
        self._mask = _map(self.path / "mask.bin", np.uint8) if self.kind == "sft" else None
        self._index = np.load(self.path / "index.npy", mmap_mode="r")

    # Pickle the location, not the mapped arrays (which numpy would copy into the pickle).
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_ids", "_mask", "_index")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self._index) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        start, end = int(self._index[i]), int(self._index[i + 1])
        ids = np.array(self._ids[start:end], dtype=np.int64)
        mask = None if self._mask is None else np.array(self._mask[start:end])
        return ids, mask

    def lengths(self) -> np.ndarray:
        """Tokens in each row."""
        return np.diff(np.asarray(self._index)).astype(np.int64)

    def loss_tokens_per_row(self, rows_per_chunk: int = 100_000) -> np.ndarray:
        """How many loss-carrying tokens each row has (SFT), read in chunks so a large file stays cheap."""
        if self._mask is None:
            return self.lengths()
        index = np.asarray(self._index, dtype=np.int64)
        out = np.empty(len(self), dtype=np.int64)
        for lo in range(0, len(self), rows_per_chunk):
            hi = min(len(self), lo + rows_per_chunk)
            base = index[lo]
            sums = np.concatenate([[0], np.cumsum(self._mask[base:index[hi]], dtype=np.int64)])
            out[lo:hi] = sums[index[lo + 1:hi + 1] - base] - sums[index[lo:hi] - base]
        return out

    def __repr__(self) -> str:
        return f"PackedDataset({str(self.path)!r}, kind={self.kind!r}, seq_len={self.seq_len}, rows={len(self)})"


# ---------------------------------------------------------------------------------------------- write side


def default_cache_dir() -> Path:
    """Where packed data goes unless pack() is told: $MINIMIND_CACHE, else ~/.cache/minimind/packed."""
    return Path(os.environ.get("MINIMIND_CACHE") or Path.home() / ".cache" / "minimind" / "packed")


def tokenizer_json(tokenizer: Any) -> str:
    """The tokenizer as its tokenizer.json text (what workers rebuild it from): from a transformers fast
    tokenizer, a `tokenizers.Tokenizer`, a tokenizer directory or a tokenizer.json path."""
    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise MiniMindError(f"{file}: no such tokenizer file")
        try:
            return Tokenizer.from_file(str(file)).to_str()
        except Exception as e:  # any parse failure is one problem to the user
            raise MiniMindError(f"{file}: unreadable tokenizer ({type(e).__name__})") from None
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise MiniMindError(f"pack: cannot use a {type(tokenizer).__name__} as the tokenizer; pass a fast "
                            "tokenizer, a tokenizers.Tokenizer or a tokenizer directory")
    return backend.to_str()


def _check_args(kind: str, seq_len: int, system_prompt_prob: float, keep_empty_think_prob: float) -> None:
    if kind not in PACK_KINDS:
        raise MiniMindError(f"pack: kind must be one of {', '.join(PACK_KINDS)}, got {kind!r} "
                            "(DPO and RL data are read row by row, not packed)")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise MiniMindError(f"pack: seq_len must be an integer of at least 2, got {seq_len!r}")
    for name, p in (("system_prompt_prob", system_prompt_prob), ("keep_empty_think_prob", keep_empty_think_prob)):
        if not 0.0 <= p <= 1.0:
            raise MiniMindError(f"pack: {name} must be between 0 and 1, got {p}")


def pack(source: str | Path, tokenizer: Any, kind: str, seq_len: int, *, cache_dir: str | Path | None = None,
         workers: int | None = None, skip_bad: bool = False, progress: bool = True, seed: int = 0,
         system_prompt_prob: float = 0.0, keep_empty_think_prob: float = 1.0, newline_loss: bool = False,
         chunk_bytes: int | None = None) -> PackedDataset:
    """Tokenize `source` into rows of `seq_len` and return them memory-mapped; cached, so a second call with
    the same file, tokenizer and settings opens the earlier result without tokenizing.

    pretrain: documents as [bos]+ids+[eos], concatenated and cut into full rows (the tail is dropped and
    counted). sft: one row per conversation with encode_chat's loss mask, truncated to seq_len (counted);
    with MiniMind's augmentations, drawn from `seed` and each line's position: a system prompt added to
    conversations without tools (probability system_prompt_prob), and the empty think blocks kept with
    probability keep_empty_think_prob (MiniMind: 0.2); newline_loss also trains the newline after each assistant
    `<|im_end|>`, as MiniMind's mask does (see chat.encode_chat). A bad line raises MiniMindError naming file:line,
    unless skip_bad, which counts it in stats.skipped_bad. workers=None uses every CPU; 1 runs in-process.
    chunk_bytes: the size of one job (default: about four a worker, at most 16 MiB)."""
    _check_args(kind, seq_len, system_prompt_prob, keep_empty_think_prob)
    source = Path(source)
    if not source.is_file():
        raise MiniMindError(f"{source}: no such file")
    if source.stat().st_size == 0:
        raise MiniMindError(f"{source}: the file is empty; there is nothing to train on")
    is_text = source.suffix.lower() in TEXT_SUFFIXES
    if is_text and kind != "pretrain":
        raise MiniMindError(f"{source}: a {source.suffix} file can only hold pretrain text, not {kind} rows")
    tok_json = tokenizer_json(tokenizer)
    vocab = Tokenizer.from_str(tok_json)
    if vocab.get_vocab_size(with_added_tokens=True) > 1 << 16:
        raise MiniMindError(f"pack: the tokenizer has {vocab.get_vocab_size(with_added_tokens=True):,} tokens; "
                            "packed ids are uint16, so at most 65,536")
    for token in (BOS, EOS):
        if vocab.token_to_id(token) is None:
            raise MiniMindError(f"pack: the tokenizer has no {token} token")

    st = source.stat()
    settings = {"kind": kind, "seq_len": seq_len}
    if kind == "sft":  # pretrain has no augmentation: its cache key ignores these
        settings.update(seed=seed, system_prompt_prob=system_prompt_prob,
                        keep_empty_think_prob=keep_empty_think_prob)
        if newline_loss:  # only when on: caches built before this setting existed keep their keys
            settings["newline_loss"] = True
    identity = {"format": FORMAT_VERSION, "path": str(source.resolve()), "size": st.st_size,
                "mtime_ns": st.st_mtime_ns, "tokenizer_sha256": hashlib.sha256(tok_json.encode()).hexdigest(),
                **settings}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{source.stem}-{kind}-{seq_len}-{key[:16]}"

    cached = _open_cached(final, key)
    if cached is None:
        root.mkdir(parents=True, exist_ok=True)
        plan = Plan(source=str(source), kind=kind, seq_len=seq_len, tokenizer_json=tok_json, shard_dir="",
                    text=is_text, skip_bad=skip_bad, seed=seed, system_prompt_prob=system_prompt_prob,
                    keep_empty_think_prob=keep_empty_think_prob, newline_loss=newline_loss)
        build(plan, identity, key, final, workers, chunk_bytes, progress)
        cached = PackedDataset(final)
        if progress:
            print(f"packed {source}: {cached.stats.summary()}", file=sys.stderr)
    elif progress:
        print(f"using packed {source} from {final}: {cached.stats.summary()}", file=sys.stderr)
    if cached.stats.skipped_bad and not skip_bad:  # a cache built with skip_bad must not hide bad lines
        raise MiniMindError(f"{cached.meta['bad_lines'][0]} {SKIP_HINT}")
    return cached


def _open_cached(final: Path, key: str) -> PackedDataset | None:
    if not final.is_dir():
        return None
    try:
        ds = PackedDataset(final)
    except MiniMindError:
        ds = None
    if ds is not None and ds.meta.get("key") == key:
        return ds
    shutil.rmtree(final, ignore_errors=True)  # only a rename creates it, so this is foreign or from old code
    return None
