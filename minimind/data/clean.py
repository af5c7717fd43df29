"""Clean a corpus: PII scrub, quality filters, decontamination, exact and near-duplicate removal, streamed from
JSONL or Parquet on several processes, resumable. `clean(["pretrain.jsonl"], "clean/")`; CLI: `minimind data clean`.

Three passes. (1) Workers take byte ranges (row groups for Parquet) and write, per range, the rows that pass
the row rules, the removed rows with their rule, and each passing row's exact hash and MinHash band keys.
(2) This process finds duplicate clusters over the hashes of all rows, in input order. (3) It merges the
parts into clean.jsonl, removed.jsonl and a report. The parts of pass 1 survive a crash, so a second run
with the same inputs and settings resumes; the output is the same for any worker count."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from minimind import MiniMindError
from minimind.data.dedup import MinHasher, clusters, exact_hash, first_of_equal, normalize, token_hashes
from minimind.data.formats import BadLine, decode_line, detect_kind, json_type, parse_row
from minimind.data.parallel import byte_ranges, cpus, ordered_map
from minimind.data.quality import (
    NgramIndex,
    c4_verdict,
    drop_boilerplate,
    gopher_verdict,
    load_rules,
    script_verdict,
    scrub_pii,
    sft_verdict,
)
from minimind.files import atomic_path

VERSION = 1  # bump when parts or their meaning change: an old work directory is then discarded, not resumed
CHUNK_BYTES = 8 << 20  # per job; fixed (not derived from the worker count) so that every count cuts alike
EXAMPLES = 3  # removed rows shown per rule in the report
KINDS = ("pretrain", "sft")


@dataclass(frozen=True)
class Plan:
    """What each worker needs; pickled to spawned processes."""

    kind: str
    rules: dict
    eval_files: tuple[str, ...]
    tokenizer: str | None
    work: str


class _Job(NamedTuple):
    number: int
    path: str
    start: int  # bytes for JSONL, a row group for Parquet
    end: int
    nbytes: int  # for the progress bar


@dataclass
class _Part:
    """A job's summary (its .json file); the rows themselves are in its .keep/.drop/.flag files and .npz."""

    number: int
    lines: int = 0  # lines (JSONL) or rows (Parquet) read
    rows: int = 0  # rows parsed
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line within the job, problem)
    removed: dict[str, int] = field(default_factory=dict)
    flagged: int = 0
    pii: int = 0  # placeholders written
    pii_rows: int = 0
    boilerplate_lines: int = 0
    boilerplate_rows: int = 0
    eval_items: int = 0  # the decontamination index's texts (the same in every part)
    eval_items_too_short: int = 0


def _text_of(messages: list) -> str:
    """What SFT deduplication and the text rules look at: the user's and the assistant's words."""
    return "\n".join(m["content"] for m in messages if isinstance(m, dict)
                     and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str))


def _decoded(raw: bytes) -> Any:
    try:
        return decode_line(raw)
    except ValueError as e:
        return e


def _json_default(value: Any) -> Any:
    raise TypeError(f"a {type(value).__name__} value cannot be written as JSON")


class _Cleaner:
    """Pass 1 for one job, in a worker process."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.rules = plan, plan.rules
        dedup = self.rules["dedup"]
        self.hasher = MinHasher(dedup["num_perm"], dedup["threshold"], dedup["shingle"], dedup["seed"])
        decon = self.rules["decontaminate"]
        self.index = NgramIndex.build(list(plan.eval_files), decon["ngram"]) if plan.eval_files and decon["enabled"] \
            else None
        self.tokenizer = None
        if plan.tokenizer:
            from minimind.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(plan.tokenizer)

    def _read(self, job: _Job) -> tuple[int, Iterator[tuple[int, bytes | None, Any]]]:
        """The job's line count (blank lines included: later jobs number their lines after it) and its rows:
        (line within the job, the raw line or None for Parquet, the decoded row or the ValueError)."""
        if job.path.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(job.path).read_row_group(job.start).to_pylist()
            return len(rows), ((i, None, row) for i, row in enumerate(rows, 1))
        with open(job.path, "rb") as f:
            f.seek(job.start)
            data = f.read(job.end - job.start)
        if job.start == 0:
            data = data.removeprefix(b"\xef\xbb\xbf")
        lines = data.split(b"\n")  # only \n ends a line, as for formats.read_lines, so the numbers agree
        if lines and not lines[-1]:
            lines.pop()
        return len(lines), ((i, raw, _decoded(raw)) for i, raw in enumerate(lines, 1) if raw.strip())

    def _pretrain(self, row: dict, part: _Part) -> tuple[str, None, bool]:
        text = row.get("text")
        if text is None:
            raise ValueError('missing field "text"')
        if not isinstance(text, str):
            raise ValueError(f'field "text" must be a string, not {json_type(text)}')
        changed = False
        if self.rules["pii"]["enabled"]:
            text, n = scrub_pii(text, self.rules["pii"])
            part.pii += n
            part.pii_rows += n > 0
            changed |= n > 0
        if self.rules["c4"]["enabled"]:
            text, n = drop_boilerplate(text, self.rules["c4"])
            part.boilerplate_lines += n
            part.boilerplate_rows += n > 0
            changed |= n > 0
        row["text"] = text
        return text, None, changed

    def _sft(self, row: dict, part: _Part) -> tuple[str, list, bool]:
        key = "conversations" if "conversations" in row else "messages"
        messages = row.get(key)
        if isinstance(messages, str):  # Parquet files (MiniMind-V's) hold the conversation as a JSON string
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as e:
                raise ValueError(f'field "{key}" is not valid JSON ({e.msg})') from None
        if not isinstance(messages, list):
            raise ValueError(f'field "{key}" must be an array, not {json_type(messages)}')
        changed = False
        if self.rules["pii"]["enabled"]:
            n_row = 0
            for m in messages:
                for k in ("content", "reasoning_content"):
                    if isinstance(m, dict) and isinstance(m.get(k), str):
                        m[k], n = scrub_pii(m[k], self.rules["pii"])
                        n_row += n
            part.pii += n_row
            part.pii_rows += n_row > 0
            changed = n_row > 0
            if changed:
                row[key] = messages if isinstance(row[key], list) else json.dumps(messages, ensure_ascii=False)
        return _text_of(messages), messages, changed

    def _verdict(self, row: dict, messages: list | None, text: str, toks: list[str],
                 hashes: np.ndarray) -> tuple[str, str] | None:
        """The first rule the row fails, or None; `messages`: an SFT row's conversation (None for pretraining)."""
        rules = self.rules
        if messages is not None and rules["sft"]["enabled"]:
            verdict = sft_verdict(messages, rules["sft"], None)
            if verdict:
                return verdict
            try:
                parsed = parse_row({"conversations": messages, **({"tools": row["tools"]} if "tools" in row else {})},
                                   "sft")
                n_tokens = None
                if self.tokenizer is not None:
                    from minimind.chat import encode_chat

                    n_tokens = len(encode_chat(self.tokenizer, parsed["messages"], parsed["tools"])[0])
            except ValueError as e:
                return "sft-invalid", str(e)
            verdict = sft_verdict(messages, rules["sft"], n_tokens)
            if verdict:
                return verdict
        if rules["script"]["enabled"]:
            verdict = script_verdict(text, rules["script"])
            if verdict:
                return verdict
        if messages is None and rules["c4"]["enabled"]:
            verdict = c4_verdict(text, rules["c4"])
            if verdict:
                return verdict
        if messages is None and rules["gopher"]["enabled"]:
            verdict = gopher_verdict(text, toks, hashes, rules["gopher"])
            if verdict:
                return verdict
        return None

    def __call__(self, job: _Job) -> _Part:
        part = _Part(job.number)
        if self.index is not None:
            part.eval_items, part.eval_items_too_short = self.index.items, self.index.short_items
        decon = self.rules["decontaminate"]
        base = Path(self.plan.work) / f"{job.number:06d}"
        cand_line, cand_exact, cand_chars, shingles, all_chars, drop_line, drop_rule = [], [], [], [], [], [], []
        with open(f"{base}.keep.tmp", "w", encoding="utf-8") as keep, \
                open(f"{base}.drop.tmp", "w", encoding="utf-8") as drop, \
                open(f"{base}.flag.tmp", "w", encoding="utf-8") as flag:
            part.lines, rows = self._read(job)
            for line, raw, row in rows:
                try:
                    if isinstance(row, ValueError):
                        raise row
                    if not isinstance(row, dict):
                        raise ValueError(f"expected a JSON object, got {json_type(row)}")
                    original = raw.decode("utf-8").strip() if raw is not None else None
                    text, messages, changed = (self._pretrain if self.plan.kind == "pretrain" else self._sft)(row, part)
                except ValueError as e:
                    part.bad.append((line, str(e)))
                    continue
                part.rows += 1
                all_chars.append(len(text))
                toks = normalize(text)
                hashes = token_hashes(toks)
                verdict = self._verdict(row, messages, text, toks, hashes)
                if original is None:
                    original = json.dumps(row, ensure_ascii=False, default=_json_default)
                if verdict is None and self.index is not None:
                    source = self.index.match(hashes)
                    if source is not None:
                        verdict = "decontaminate", f"shares a {decon['ngram']}-gram with {source}"
                        if decon["action"] == "flag":
                            flag.write(_entry(verdict, original) + "\n")
                            part.flagged += 1
                            verdict = None
                if verdict is not None:
                    part.removed[verdict[0]] = part.removed.get(verdict[0], 0) + 1
                    drop.write(_entry(verdict, original) + "\n")
                    drop_line.append(line)
                    drop_rule.append(verdict[0])
                    continue
                out = json.dumps(row, ensure_ascii=False, default=_json_default) if changed else original
                keep.write(out + "\n")
                cand_line.append(line)
                cand_exact.append(exact_hash(toks))
                cand_chars.append(len(text))
                shingles.append(self.hasher.shingles(hashes))
        signatures = self.hasher.signatures(shingles)
        bands = self.hasher.band_keys(signatures)
        np.savez(f"{base}.tmp.npz", cand_line=np.array(cand_line, np.int64),
                 cand_exact=np.array(cand_exact, np.uint64), cand_chars=np.array(cand_chars, np.int64),
                 has_shingles=np.array([len(s) > 0 for s in shingles], bool), bands=bands, signatures=signatures,
                 all_chars=np.array(all_chars, np.int64), drop_line=np.array(drop_line, np.int64),
                 drop_rule=np.array(drop_rule, dtype=str))
        for suffix in ("keep", "drop", "flag"):
            os.replace(f"{base}.{suffix}.tmp", f"{base}.{suffix}.jsonl")
        os.replace(f"{base}.tmp.npz", f"{base}.npz")
        with atomic_path(f"{base}.json") as tmp:  # written last: the part is complete once this exists
            tmp.write_text(json.dumps(asdict(part)), encoding="utf-8")
        return part


def _entry(verdict: tuple[str, str], row_json: str) -> str:
    """A removed row as a JSON object: its rule, why, and the row itself (original JSON, embedded as is)."""
    return f'{{"rule": {json.dumps(verdict[0])}, "detail": {json.dumps(verdict[1], ensure_ascii=False)}, ' \
           f'"row": {row_json}}}'


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class CleanReport:
    """What a run did; also written as stats.json."""

    inputs: list[str]
    kind: str
    bytes_in: int
    rows_in: int = 0
    rows_out: int = 0
    bad_lines: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    flagged: int = 0
    pii_replacements: int = 0
    pii_rows: int = 0
    boilerplate_lines: int = 0
    boilerplate_rows: int = 0
    eval_items: int = 0
    eval_items_too_short: int = 0
    seconds: float = 0.0
    mb_per_s: float = 0.0
    peak_rss_mb: float = 0.0  # the largest process: this one or a worker
    resumed_parts: int = 0
    workers: int = 1


def _identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _jobs(paths: list[Path], chunk_bytes: int) -> list[_Job]:
    jobs: list[_Job] = []
    for path in paths:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            size = path.stat().st_size
            for g in range(meta.num_row_groups):
                jobs.append(_Job(len(jobs), str(path), g, g + 1, size // max(1, meta.num_row_groups)))
        else:
            for a, b in byte_ranges(path, path.stat().st_size, chunk_bytes):
                jobs.append(_Job(len(jobs), str(path), a, b, b - a))
    return jobs


def _detect_kind(path: Path) -> str:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        names = set(pq.ParquetFile(path).schema_arrow.names)
        if "text" in names:
            return "pretrain"
        if names & {"conversations", "messages"}:
            return "sft"
        raise MiniMindError(f"{path}: no `text`, `conversations` or `messages` column; pass --kind")
    kind = detect_kind(path)
    if kind not in KINDS:
        raise MiniMindError(f"{path}: holds {kind} rows; clean takes pretrain or SFT data")
    return kind


def _peak_rss_mb() -> float:
    """The largest resident set of this process and of any finished worker (Linux reports kB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def clean(inputs: list[str | Path], out_dir: str | Path, *, kind: str | None = None, config: str | Path | None = None,
          eval_files: list[str | Path] = (), tokenizer: str | None = None, workers: int | None = None,
          strict: bool = False, chunk_bytes: int = CHUNK_BYTES, progress: bool = False) -> CleanReport:
    """Clean `inputs` (JSONL or Parquet, pretrain or SFT rows) into `out_dir`: clean.jsonl, removed.jsonl (every
    removed row with its rule, detail and, for duplicates, the kept row of its cluster), flagged.jsonl (with
    decontaminate.action = "flag"), report.md, lengths.png and stats.json. A malformed line is skipped and
    listed (`strict`: the run stops at it, naming file:line). Rerun after a crash to resume."""
    started = time.perf_counter()
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise MiniMindError(f"{p}: no such file")
    kinds = {kind or _detect_kind(p) for p in paths}
    if len(kinds) > 1:
        raise MiniMindError(f"inputs hold different kinds of rows ({', '.join(sorted(kinds))}); clean them apart")
    kind = kinds.pop()
    if kind not in KINDS:
        raise MiniMindError(f"unknown kind {kind!r}; expected pretrain or sft")
    rules = load_rules(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"
    settings = {"version": VERSION, "kind": kind, "rules": rules, "chunk_bytes": chunk_bytes,
                "inputs": [_identity(p) for p in paths], "eval": [_identity(Path(p)) for p in eval_files],
                "tokenizer": tokenizer and str(Path(tokenizer).resolve())}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    if (work / "key").is_file() and (work / "key").read_text() != key:
        shutil.rmtree(work)  # another run's parts: not ours to resume
    work.mkdir(exist_ok=True)
    (work / "key").write_text(key)

    plan = Plan(kind, rules, tuple(str(p) for p in eval_files), tokenizer, str(work))
    jobs = _jobs(paths, chunk_bytes)
    done = {j.number for j in jobs if (work / f"{j.number:06d}.json").is_file()}
    todo = [j for j in jobs if j.number not in done]
    workers = max(1, min(workers or cpus(), len(todo) or 1))
    report = CleanReport([str(p) for p in paths], kind, sum(p.stat().st_size for p in paths),
                         resumed_parts=len(done), workers=workers)
    if done:
        print(f"resuming: {len(done)} of {len(jobs)} parts already done in {work}")
    with tqdm(total=sum(j.nbytes for j in jobs), unit="B", unit_scale=True, unit_divisor=1024, desc="cleaning",
              disable=not progress) as bar, closing(ordered_map(_Cleaner, plan, todo, workers, "cleaning")) as run:
        bar.update(sum(j.nbytes for j in jobs if j.number in done))
        for _ in run:
            bar.update(jobs[_.number].nbytes)
    parts = [_Part(**json.loads((work / f"{j.number:06d}.json").read_text())) for j in jobs]
    examples = _merge(jobs, parts, plan, out, report, strict)
    if parts:
        report.eval_items, report.eval_items_too_short = parts[0].eval_items, parts[0].eval_items_too_short
    report.seconds = round(time.perf_counter() - started, 2)
    report.mb_per_s = round(report.bytes_in / 1e6 / max(report.seconds, 1e-9), 2)
    report.peak_rss_mb = round(_peak_rss_mb(), 1)
    _write_report(out, report, examples)
    shutil.rmtree(work)
    return report


def _merge(jobs: list[_Job], parts: list[_Part], plan: Plan, out: Path, report: CleanReport,
           strict: bool) -> dict[str, list[str]]:
    """Passes 2 and 3: duplicate clusters over every passing row in input order, then the output files;
    returns a few removed rows per rule, for the report."""
    work, dedup = Path(plan.work), plan.rules["dedup"]
    arrays = [{k: v for k, v in np.load(work / f"{j.number:06d}.npz").items() if k != "signatures"} for j in jobs]
    exact = np.concatenate([a["cand_exact"] for a in arrays]) if arrays else np.zeros(0, np.uint64)
    bands = np.concatenate([a["bands"] for a in arrays]) if arrays else np.zeros((0, 1), np.uint64)
    has_shingles = np.concatenate([a["has_shingles"] for a in arrays]) if arrays else np.zeros(0, bool)
    n = len(exact)
    index = np.arange(n)
    first = first_of_equal(exact) if dedup["exact"] else index
    exact_dup = first != index
    root = index.copy()
    if dedup["near"]:
        active = np.flatnonzero(~exact_dup & has_shingles)
        root[active] = active[clusters(bands[active], _signatures(jobs, work, active, dedup["num_perm"]),
                                       dedup["threshold"])]
    cluster = np.where(exact_dup, root[first], root)
    near_dup = ~exact_dup & (root != index)

    # Where each passing row came from (two integers a row, not a Python object), to name a cluster's kept row.
    line_base: dict[int, int] = {}
    base, last_path = 0, None
    for job, part in zip(jobs, parts):
        if job.path != last_path:
            base, last_path = 0, job.path
        line_base[job.number] = base
        base += part.lines
    row_job = np.concatenate([np.full(len(a["cand_line"]), k) for k, a in enumerate(arrays)]) if arrays else index
    row_line = np.concatenate([a["cand_line"] + line_base[j.number] for j, a in zip(jobs, arrays)]) if arrays \
        else index

    examples: dict[str, list[str]] = {}
    removed = Counter()
    for part in parts:
        removed.update(part.removed)
        report.flagged += part.flagged
        report.pii_replacements += part.pii
        report.pii_rows += part.pii_rows
        report.boilerplate_lines += part.boilerplate_lines
        report.boilerplate_rows += part.boilerplate_rows
        report.rows_in += part.rows
    i = 0
    with atomic_path(out / "clean.jsonl") as clean_tmp, atomic_path(out / "removed.jsonl") as removed_tmp, \
            atomic_path(out / "flagged.jsonl") as flagged_tmp:
        with open(clean_tmp, "w", encoding="utf-8") as kept_f, open(removed_tmp, "w", encoding="utf-8") as rem_f, \
                open(flagged_tmp, "w", encoding="utf-8") as flag_f:
            for job, part, a in zip(jobs, parts, arrays):
                offset = line_base[job.number]
                entries: list[tuple[int, str]] = []
                for line, problem in part.bad:
                    bad = BadLine(job.path, offset + line, problem)
                    if strict:
                        raise MiniMindError(f"{bad} (drop --strict to skip malformed lines)")
                    report.bad_lines += 1
                    removed["malformed"] += 1
                    entries.append((offset + line, "malformed", json.dumps({"rule": "malformed", "detail": problem})))
                with open(work / f"{job.number:06d}.drop.jsonl", encoding="utf-8") as f:
                    entries += [(offset + int(x), str(r), e.rstrip("\n"))
                                for x, r, e in zip(a["drop_line"], a["drop_rule"], f)]
                with open(work / f"{job.number:06d}.keep.jsonl", encoding="utf-8") as f:
                    for x, row in zip(a["cand_line"], f):
                        row = row.rstrip("\n")
                        if exact_dup[i] or near_dup[i]:
                            rule = "exact-dup" if exact_dup[i] else "near-dup"
                            ref = f"{jobs[row_job[cluster[i]]].path}:{row_line[cluster[i]]}"
                            removed[rule] += 1
                            entries.append((offset + int(x), rule, _entry((rule, f"duplicate of {ref}"), row)[:-1]
                                            + f', "cluster": {json.dumps(ref)}}}'))
                        else:
                            kept_f.write(row + "\n")
                            report.rows_out += 1
                        i += 1
                with open(work / f"{job.number:06d}.flag.jsonl", encoding="utf-8") as f:
                    shutil.copyfileobj(f, flag_f)
                for line, rule, entry in sorted(entries, key=lambda e: e[0]):
                    head = f'{{"file": {json.dumps(job.path)}, "line": {line}, '
                    rem_f.write(head + entry[1:] + "\n")
                    if len(examples.setdefault(rule, [])) < EXAMPLES:
                        examples[rule].append(head + entry[1:])
    report.removed = dict(sorted(removed.items(), key=lambda kv: -kv[1]))
    keep_mask = ~(exact_dup | near_dup)
    cand_chars = np.concatenate([a["cand_chars"] for a in arrays]) if arrays else np.zeros(0, np.int64)
    _plot_lengths(out / "lengths.png", np.concatenate([a["all_chars"] for a in arrays]) if arrays else cand_chars,
                  cand_chars[keep_mask])
    return examples


def _signatures(jobs: list[_Job], work: Path, rows: np.ndarray, num_perm: int) -> np.ndarray:
    """The MinHash signatures of the passing rows `rows` (indices in input order), gathered from the parts into
    one memory-mapped file: 512 bytes a row stay on disk, not in memory."""
    out = np.lib.format.open_memmap(work / "signatures.npy", mode="w+", dtype=np.uint32,
                                    shape=(len(rows), num_perm))
    start = at = 0
    for j in jobs:
        sig = np.load(work / f"{j.number:06d}.npz")["signatures"]
        take = rows[(rows >= start) & (rows < start + len(sig))] - start
        out[at: at + len(take)] = sig[take]
        at += len(take)
        start += len(sig)
    out.flush()
    return np.load(work / "signatures.npy", mmap_mode="r")


def _plot_lengths(path: Path, before: np.ndarray, after: np.ndarray) -> None:
    """Histograms of row length in characters (log scale), before and after cleaning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(int(before.max()) if len(before) else 1, 10)
    bins = np.logspace(0, np.log10(top + 1), 50)
    ax.hist(before + 1, bins=bins, alpha=0.5, label=f"before ({len(before):,} rows)")
    ax.hist(after + 1, bins=bins, alpha=0.5, label=f"after ({len(after):,} rows)")
    ax.set_xscale("log")
    ax.set_xlabel("characters per row")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _excerpt(entry: str, width: int = 160) -> str:
    """The text of a removed row, shortened, for the report."""
    row = json.loads(entry).get("row")
    if isinstance(row, dict):
        messages = row.get("conversations") or row.get("messages")
        text = row["text"] if "text" in row else _text_of(messages) if isinstance(messages, list) else json.dumps(row)
    else:
        text = str(row or "")
    text = " ".join(str(text).split())
    return text[:width] + ("…" if len(text) > width else "")


def _write_report(out: Path, report: CleanReport, examples: dict[str, list[str]]) -> None:
    r = report
    lines = [f"# Cleaning report: {', '.join(r.inputs)}", "",
             f"{r.kind} rows: {r.rows_in:,} in, {r.rows_out:,} out ({r.rows_out / max(r.rows_in, 1):.1%} kept), "
             f"{r.bad_lines:,} malformed lines skipped. {r.bytes_in / 1e6:,.1f} MB in {r.seconds:,.1f} s "
             f"({r.mb_per_s:,.2f} MB/s, {r.workers} worker(s)); peak memory {r.peak_rss_mb:,.0f} MB."
             + (f" Resumed {r.resumed_parts} finished parts." if r.resumed_parts else ""), "",
             "| rule | rows removed | share of rows |", "|---|---:|---:|"]
    lines += [f"| {rule} | {n:,} | {n / max(r.rows_in + r.bad_lines, 1):.2%} |" for rule, n in r.removed.items()]
    lines += ["", f"Rewritten, not removed: {r.pii_replacements:,} emails / phone numbers / IP addresses in "
              f"{r.pii_rows:,} rows; {r.boilerplate_lines:,} boilerplate lines dropped from "
              f"{r.boilerplate_rows:,} rows."]
    if r.eval_items:
        lines += ["", f"Decontamination: {r.eval_items:,} evaluation texts, of which {r.eval_items_too_short:,} are "
                  "too short to hold an n-gram and cannot be checked; "
                  f"{r.removed.get('decontaminate', 0):,} rows removed, {r.flagged:,} flagged."]
    lines += ["", "![row lengths before and after](lengths.png)", "", "## Examples of each rule's removals", ""]
    for rule, entries in examples.items():
        lines.append(f"**{rule}**")
        lines += [f"- line {json.loads(e)['line']}: {json.loads(e)['detail']}: `{_excerpt(e)}`" for e in entries]
        lines.append("")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    with atomic_path(out / "stats.json") as tmp:
        tmp.write_text(json.dumps(asdict(r), indent=2) + "\n", encoding="utf-8")
