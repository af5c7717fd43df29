"""Tokenize-and-pack speed: `pack` with 1 and 2 workers against plain `tokenizer(texts)` on the same ~100 MB of
built-in text, in one run, interleaved, as ratios. `python bench/pack.py [--mb 100] [--rounds 2] [--workers 1,2]`"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import tempfile
import time
from pathlib import Path

from minimind.data.builtin import chinese_documents, english_documents
from minimind.data.pack import pack
from minimind.tokenizer import train_tokenizer


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Built-in English scenes and Chinese paragraphs, reshuffled on each pass until the file is big enough."""
    docs = list(english_documents()) + list(chinese_documents())
    rng = random.Random(seed)
    target, written = int(megabytes * 1e6), 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(docs)
            for doc in docs:
                line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    break
    return written


def plain_tokenize(tokenizer, path: Path, batch: int = 1000) -> int:
    """The reference: read the rows and call the transformers tokenizer on batches of texts; tokens made."""
    tokens, texts = 0, []
    with path.open(encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == batch:
                tokens += sum(len(ids) + 2 for ids in tokenizer(texts)["input_ids"])  # + bos and eos, as pack
                texts = []
    if texts:
        tokens += sum(len(ids) + 2 for ids in tokenizer(texts)["input_ids"])
    return tokens


def _spin(n: int) -> float:
    start = time.perf_counter()
    total = 0
    for i in range(n):
        total += i * i
    return time.perf_counter() - start


def parallel_capacity(processes: int, n: int = 10_000_000) -> float:
    """How many times one process's throughput `processes` busy processes get here (shared or SMT cores give
    less than `processes`): the ceiling for any workers=N speed-up on this machine."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_spin, [1000] * processes)  # start the workers before timing
        one = pool.apply(_spin, (n,))
        start = time.perf_counter()
        pool.map(_spin, [n] * processes, chunksize=1)
        return processes * one / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100, help="size of the generated pretrain JSONL in MB")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are reported")
    parser.add_argument("--seq-len", type=int, default=512, help="packed row length")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to compare")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sample = root / "sample.jsonl"
        write_corpus(sample, 4, seed=1)
        tokenizer = train_tokenizer([sample], 6400, out_dir=root / "tok", progress=False)
        corpus = root / "pretrain.jsonl"
        size = write_corpus(corpus, args.mb)
        print(f"corpus: {size / 1e6:.1f} MB of JSONL; tokenizer: 6400 tokens trained on 4 MB")

        times: dict[str, list[float]] = {f"pack workers={w}": [] for w in counts}
        times["tokenizer(texts)"] = []
        tokens = 0
        for r in range(args.rounds):
            for name in times:
                start = time.perf_counter()
                if name.startswith("pack"):
                    workers = int(name.split("=")[1])
                    ds = pack(corpus, tokenizer, "pretrain", args.seq_len, cache_dir=root / f"cache{r}{workers}",
                              workers=workers, progress=False)
                    made = ds.stats.tokens + ds.stats.dropped_tokens
                else:
                    made = plain_tokenize(tokenizer, corpus)
                times[name].append(time.perf_counter() - start)
                if tokens and made != tokens:
                    raise SystemExit(f"{name} made {made:,} tokens, the others {tokens:,}")
                tokens = made

        print(f"{tokens:,} tokens; median of {args.rounds} interleaved rounds")
        reference = statistics.median(times["tokenizer(texts)"])
        for name, ts in times.items():
            t = statistics.median(ts)
            print(f"  {name:18s} {t:7.2f} s  {tokens / t / 1e6:6.2f} M tokens/s  {size / t / 1e6:6.2f} MB/s  "
                  f"x{reference / t:.2f} vs tokenizer(texts)")
        one = statistics.median(times[f"pack workers={counts[0]}"])
        for w in counts[1:]:
            speedup = one / statistics.median(times[f"pack workers={w}"])
            print(f"  workers={w} / workers={counts[0]} speed-up: x{speedup:.2f} "
                  f"(this machine's ceiling for {w} busy processes: x{parallel_capacity(w):.2f})")

if __name__ == "__main__":
    main()
