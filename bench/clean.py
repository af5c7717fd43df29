"""Near-duplicate removal throughput: `minimind data clean` (dedup rules only) against datasketch's MinHashLSH used
plainly, on the same synthetic corpus with planted duplicates, in the same run, with recall and precision for both.
`python bench/clean.py [--mb 200]` (needs `pip install datasketch`)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minimind.data.dedup import normalize, planted_corpus

DEDUP_ONLY = "[pii]\nenabled = false\n[c4]\nenabled = false\n[script]\nenabled = false\n[gopher]\nenabled = false\n"


def _scores(removed: set[int], groups: list[int]) -> tuple[float, float]:
    """(precision, recall) of the removed rows against every row but the first of its group."""
    seen: set[int] = set()
    should = set()
    for i, g in enumerate(groups):
        if g in seen:
            should.add(i)
        seen.add(g)
    hits = len(removed & should)
    return hits / max(len(removed), 1), hits / max(len(should), 1)


def _datasketch(path: Path, num_perm: int, threshold: float, shingle: int) -> set[int]:
    """The textbook use: one MinHash per row over its word shingles, query the LSH index, insert if new."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    removed = set()
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            toks = normalize(json.loads(line)["text"])
            shingles = {" ".join(toks[j: j + shingle]).encode() for j in range(max(1, len(toks) - shingle + 1))}
            m = MinHash(num_perm=num_perm)
            m.update_batch(shingles)
            if lsh.query(m):
                removed.add(i)
            else:
                lsh.insert(i, m)
    return removed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mb", type=float, default=200, help="size of the synthetic corpus")
    p.add_argument("--lang", default="en", choices=["en", "zh"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        texts, groups = planted_corpus(int(args.mb * 1e6 / (1100 if args.lang == "en" else 950)), args.lang, seed=0)
        src = tmp / "corpus.jsonl"
        with src.open("w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        size = src.stat().st_size / 1e6
        print(f"corpus: {len(texts):,} rows, {size:,.1f} MB, {len(texts) - len(set(groups)):,} planted duplicates "
              f"(made in {time.perf_counter() - t0:.0f} s)")
        config = tmp / "dedup.toml"
        config.write_text(DEDUP_ONLY)

        def ours(workers: int, out: str) -> tuple[set[int], float]:
            # A process of its own, as a user runs it, so that its peak memory is its own.
            cmd = [sys.executable, "-m", "minimind", "data", "clean", str(src), "--out", str(tmp / out),
                   "--config", str(config), "--workers", str(workers), "--quiet"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            stats = json.loads((tmp / out / "stats.json").read_text())
            removed = {json.loads(x)["line"] - 1 for x in (tmp / out / "removed.jsonl").open(encoding="utf-8")}
            return removed, stats["peak_rss_mb"]

        # Ours before and after the reference (A B A), so that a drift in the machine's speed shows.
        runs = [("minimind, 1 worker", lambda: ours(1, "a1")),
                ("datasketch MinHashLSH", lambda: (_datasketch(src, 128, 0.8, 5), None)),
                ("minimind, 1 worker (again)", lambda: ours(1, "a2")),
                ("minimind, 2 workers", lambda: ours(2, "b"))]
        rows = []
        for name, run in runs:
            t0 = time.perf_counter()
            removed, rss = run()
            seconds = time.perf_counter() - t0
            precision, recall = _scores(removed, groups)
            rows.append((name, seconds, size / seconds, precision, recall, rss))
            print(f"{name}: {seconds:.1f} s", flush=True)
    base = rows[1][2]
    print(f"\n| engine | seconds | MB/s | vs datasketch | precision | recall | peak RSS MB ({size:.0f} MB file) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, seconds, mbs, precision, recall, rss in rows:
        print(f"| {name} | {seconds:.1f} | {mbs:.2f} | {mbs / base:.2f}x | {precision:.4f} | {recall:.4f} | "
              f"{'-' if rss is None else f'{rss:.0f}'} |")


if __name__ == "__main__":
    main()
