"""Exact and near-duplicate detection: normalised-text hashes, MinHash signatures with LSH banding (the scheme
of datasketch, text-dedup and datatrove), and clusters that keep their first row. Used by data/clean.py."""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass

import numpy as np

# Han, kana and Hangul have no spaces between words: each character is one token there.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{CJK}]|[^\W{CJK}]+")  # a CJK character, or a run of other word characters
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_SHIFT32 = np.uint64(32)
CANDIDATE_MARGIN = 0.1
_BLOCK = 1 << 10  # shingles hashed at once: a (shingles x permutations) matrix of 1 MB at 128, in cache


def normalize(text: str) -> list[str]:
    """The text as duplicates are compared, as tokens: NFKC, case-folded, punctuation and symbols dropped, split
    into words (and single characters in CJK text). `" ".join(tokens)` is the normalised text."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def exact_hash(toks: list[str]) -> int:
    """A 64-bit hash of the normalised text (the same value on every machine and in every process)."""
    return int.from_bytes(hashlib.blake2b(" ".join(toks).encode("utf-8"), digest_size=8).digest(), "little")


def token_hashes(toks: list[str]) -> np.ndarray:
    """Each token's CRC-32 as uint64: deterministic across processes, unlike Python's hash()."""
    return np.fromiter(map(zlib.crc32, map(str.encode, toks)), dtype=np.uint64, count=len(toks))


_NGRAM_MULT = np.random.default_rng(20261207).integers(1, 2**63, size=64, dtype=np.uint64) * 2 + 1


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """One uint64 per run of n consecutive tokens (a text shorter than n gives one hash of all its tokens;
    an empty one none). A weighted sum with odd multipliers, so the order of the tokens counts."""
    if len(hashes) == 0:
        return np.zeros(0, np.uint64)
    n = min(n, len(hashes))
    with np.errstate(over="ignore"):
        out = hashes[: len(hashes) - n + 1] * _NGRAM_MULT[0]
        for i in range(1, n):
            out = out + hashes[i: len(hashes) - n + 1 + i] * _NGRAM_MULT[i]
    return out


def _false_rates(threshold: float, bands: int, rows: int) -> tuple[float, float]:
    """The chance that a pair below the threshold shares a band (false positive), and that one above it shares
    none (false negative), integrated over Jaccard similarity."""
    below = np.linspace(0.0, threshold, 200)
    above = np.linspace(threshold, 1.0, 200)
    p_below = 1 - (1 - below**rows) ** bands
    p_above = 1 - (1 - above**rows) ** bands
    return float(np.trapezoid(p_below, below)), float(np.trapezoid(1 - p_above, above))


def lsh_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) with bands * rows <= num_perm that minimise false positives plus false negatives,
    as datasketch chooses them for equal weights."""
    best, shape = float("inf"), (1, num_perm)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp, fn = _false_rates(threshold, bands, rows)
            if fp + fn < best:
                best, shape = fp + fn, (bands, rows)
    return shape


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the 64-bit output."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class MinHasher:
    """MinHash signatures of shingle sets and their LSH band keys. Each permutation is a multiply-add-shift hash
    of the 32-bit shingle hash, (a*x + b) >> 32 over 64 bits (2-universal); `seed` fixes them."""

    num_perm: int = 128
    threshold: float = 0.8
    shingle: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        object.__setattr__(self, "_a", rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64) * 2 + 1)
        object.__setattr__(self, "_b", rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64))
        # Bands for a lower threshold let pairs just above the real one become candidates (LSH alone misses
        # about half the pairs at its threshold); clusters() then checks each candidate pair's signatures.
        bands, rows = lsh_shape(max(self.threshold - CANDIDATE_MARGIN, 0.05), self.num_perm)
        object.__setattr__(self, "bands", bands)
        object.__setattr__(self, "rows", rows)

    def shingles(self, hashes: np.ndarray) -> np.ndarray:
        """32-bit hashes of the text's shingles (runs of `shingle` tokens), given its token_hashes()."""
        return ngram_hashes(hashes, self.shingle) >> _SHIFT32

    def signatures(self, shingle_sets: list[np.ndarray]) -> np.ndarray:
        """(texts, num_perm) uint32: the minimum of each permutation over each text's shingles; a text with no
        shingles gets all ones (and matches nothing: see band_keys)."""
        out = np.full((len(shingle_sets), self.num_perm), 0xFFFFFFFF, dtype=np.uint32)
        i = 0
        while i < len(shingle_sets):
            j, total = i, 0  # texts i..j-1 go together, about _BLOCK shingles (at least one text)
            while j < len(shingle_sets) and (j == i or total + len(shingle_sets[j]) <= _BLOCK):
                total += len(shingle_sets[j])
                j += 1
            sizes = np.array([len(s) for s in shingle_sets[i:j]])
            present = np.flatnonzero(sizes)
            if len(present):
                flat = np.concatenate([shingle_sets[i + k] for k in present])
                values = np.multiply(flat[:, None], self._a[None, :])  # wraps modulo 2**64, as intended
                values += self._b[None, :]
                starts = np.concatenate([[0], np.cumsum(sizes[present])[:-1]])
                # The shift is monotone, so it can follow the minimum (on texts x perms, not shingles x perms).
                out[i + present] = np.minimum.reduceat(values, starts, axis=0) >> _SHIFT32
            i = j
        return out

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(texts, bands) uint64: one key per band of `rows` signature values; two texts that share a key are
        candidates. Callers leave out texts without shingles: their all-ones signatures would all match."""
        keys = np.zeros((len(signatures), self.bands), dtype=np.uint64)
        sig = signatures.astype(np.uint64)
        for band in range(self.bands):
            h = np.full(len(sig), band, dtype=np.uint64)
            for col in range(band * self.rows, (band + 1) * self.rows):
                h = _mix(h ^ sig[:, col])
            keys[:, band] = h
        return keys


def first_of_equal(keys: np.ndarray) -> np.ndarray:
    """For each row, the index of the first row with the same key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_first = order[np.flatnonzero(starts)]
    first = np.empty(len(keys), dtype=np.int64)
    first[order] = np.repeat(group_first, np.diff(np.append(np.flatnonzero(starts), len(keys))))
    return first


def clusters(band_keys: np.ndarray, signatures: np.ndarray, threshold: float, batch: int = 1 << 16) -> np.ndarray:
    """For each row, the first (lowest-index) row of its cluster: a row is linked to the first row of each band
    bucket it shares when their signatures agree on at least `threshold` of the permutations (the MinHash
    estimate of Jaccard similarity), and a cluster is a connected group, as in text-dedup and datatrove. A row
    that is its own root is kept. `signatures` may be a memory map: it is read in batches of linked pairs."""
    n = len(band_keys)
    if n == 0:
        return np.zeros(0, np.int64)
    u = np.concatenate([np.arange(n)] * band_keys.shape[1])
    v = np.concatenate([first_of_equal(band_keys[:, b]) for b in range(band_keys.shape[1])])
    linked = u != v
    code = np.unique(u[linked] * n + v[linked])  # one int64 a pair: unique in 1-D, a fraction of the memory
    pairs = np.stack([code // n, code % n], axis=1)
    keep = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), batch):
        a, b = pairs[start: start + batch, 0], pairs[start: start + batch, 1]
        keep[start: start + batch] = (signatures[a] == signatures[b]).mean(axis=1) >= threshold
    u, v = pairs[keep, 0], pairs[keep, 1]
    label = np.arange(n, dtype=np.int64)
    while True:  # propagate the smallest index along the links, with pointer jumping: a few rounds in practice
        new = label.copy()
        np.minimum.at(new, u, label[v])
        np.minimum.at(new, v, label[u])
        new = new[new]
        if np.array_equal(new, label):
            return label
        label = new


def planted_corpus(n_docs: int, lang: str = "en", near_rates: tuple[float, ...] = (0.005, 0.01),
                   near_share: float = 0.2, exact_share: float = 0.05, far_share: float = 0.1, far_rate: float = 0.3,
                   seed: int = 0) -> tuple[list[str], list[int]]:
    """A synthetic corpus with planted duplicates and its ground truth, for tests and bench/clean.py: (texts,
    group of each text). Unique documents of random words ("en") or characters ("zh"); copies of earlier ones
    that differ in case and spacing (exact after normalising), that have a share `rate` of their tokens
    replaced, inserted or deleted (near), or `far_rate` of them (a different document: its own group)."""
    import random

    rng = random.Random(seed)
    if lang == "en":
        vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                 for _ in range(5000)]
        join, length = " ", (120, 260)
    else:
        vocab = [chr(0x4E00 + rng.randrange(3500)) for _ in range(3500)]
        join, length = "", (200, 450)

    def edit(toks: list[str], rate: float) -> list[str]:
        out = []
        for t in toks:
            r = rng.random()
            if r < rate / 3:
                continue  # deleted
            out.append(rng.choice(vocab) if r < 2 * rate / 3 else t)  # replaced, or kept
            if r < rate and r >= 2 * rate / 3:
                out.append(rng.choice(vocab))  # inserted
        return out

    docs: list[list[str]] = []
    texts, groups = [], []
    for _ in range(n_docs):
        roll = rng.random()
        if docs and roll < near_share + exact_share + far_share:
            source = rng.randrange(len(docs))
            if roll < exact_share:
                text = join.join(docs[source]).upper() if lang == "en" else "  ".join(docs[source])
                texts.append(text)
                groups.append(source)
                continue
            far = roll >= near_share + exact_share
            toks = edit(docs[source], far_rate if far else rng.choice(near_rates))
            docs.append(toks)
            texts.append(join.join(toks))
            groups.append(len(docs) - 1 if far else source)
            if not far:
                docs.pop()  # a near copy belongs to its source's group; later copies copy the source
            continue
        toks = [rng.choice(vocab) for _ in range(rng.randint(*length))]
        docs.append(toks)
        texts.append(join.join(toks))
        groups.append(len(docs) - 1)
    return texts, groups
