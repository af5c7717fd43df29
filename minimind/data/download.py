"""MiniMind's published dataset files by name, from the Hugging Face Hub (huggingface_hub; HF_ENDPOINT honoured) or
ModelScope (plain HTTP, resumable), with size checks, and sha256 checks where a hash is known (the Hub's LFS ETag,
or one given; the registry has none). `minimind data download sft_t2t_mini --out data/`."""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.parse import quote

from minimind import MiniMindError

HF_REPO = "jingyaogong/minimind_dataset"
MS_REPO = "gongjy/minimind_dataset"
HF_ENDPOINT = "https://huggingface.co"
MS_ENDPOINT = "https://www.modelscope.cn"
SOURCES = ("hf", "modelscope")
CHUNK = 1 << 20


@dataclass(frozen=True)
class DatasetFile:
    filename: str
    size: str  # approximate, as MiniMind's README lists it
    use: str  # what MiniMind trains with it
    sha256: str | None = None  # none known yet; without one, only the Hub's LFS sha256 (ETag) can be checked
    modelscope: bool = True  # also on ModelScope


# MiniMind's dataset repository (reference/minimind.md section 4.1). Sizes are the README's, so approximate.
REGISTRY: dict[str, DatasetFile] = {
    "pretrain_t2t_mini": DatasetFile("pretrain_t2t_mini.jsonl", "1.2 GB", "pretrain (default, ~0.25B tokens)"),
    "pretrain_t2t": DatasetFile("pretrain_t2t.jsonl", "10 GB", "pretrain (full recipe, ~2.2B tokens)"),
    "sft_t2t_mini": DatasetFile("sft_t2t_mini.jsonl", "1.6 GB", "sft, distill, tokenizer (default)"),
    "sft_t2t": DatasetFile("sft_t2t.jsonl", "14 GB", "sft (full recipe)"),
    "dpo": DatasetFile("dpo.jsonl", "53 MB", "dpo"),
    "rlaif": DatasetFile("rlaif.jsonl", "24 MB", "ppo, grpo prompts"),
    "agent_rl": DatasetFile("agent_rl.jsonl", "86 MB", "agent RL (tool use)"),
    "agent_rl_math": DatasetFile("agent_rl_math.jsonl", "18 MB", "agent RL (math, RLVR)"),
    "lora_medical": DatasetFile("lora_medical.jsonl", "34 MB", "lora (medical)"),
    "lora_identity": DatasetFile("lora_identity.jsonl", "23 KB", "lora (identity)"),
    "lora_exam": DatasetFile("lora_exam.jsonl", "?", "lora (exam; Hugging Face only)", modelscope=False),
}


def resolve(name: str) -> DatasetFile:
    """A registry entry by name (`sft_t2t_mini`) or file name (`sft_t2t_mini.jsonl`)."""
    key = name.removesuffix(".jsonl")
    if key not in REGISTRY:
        raise MiniMindError(f"unknown dataset {name!r}; `minimind data download --list` shows: "
                            + ", ".join(REGISTRY))
    return REGISTRY[key]


def format_list() -> str:
    width = max(map(len, REGISTRY))
    lines = [f"{'name':<{width}}  {'size':>7}  used for", f"{'-' * width}  {'-' * 7}  {'-' * 8}"]
    lines += [f"{k:<{width}}  {v.size:>7}  {v.use}" for k, v in REGISTRY.items()]
    lines.append(f"from huggingface.co/datasets/{HF_REPO} (--source hf) or modelscope.cn/datasets/{MS_REPO} "
                 "(--source modelscope)")
    return "\n".join(lines)


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, size: int | None, sha256: str | None) -> None:
    """Raise MiniMindError (and keep the file, renamed .bad, for inspection) if size or sha256 disagree."""
    problem = None
    actual = path.stat().st_size
    if size is not None and actual != size:
        problem = f"size {actual:,} bytes, expected {size:,}"
    elif sha256 is not None and len(sha256) == 64 and (got := sha256_of(path)) != sha256.lower():
        problem = f"sha256 {got}, expected {sha256.lower()}"
    if problem:
        bad = path.with_name(path.name + ".bad")
        os.replace(path, bad)
        raise MiniMindError(f"{path}: download is corrupt ({problem}); moved to {bad.name}, run again")


# ---- Hugging Face Hub ---------------------------------------------------------------------------------


def download_hf(filename: str, out_dir: str | Path, repo: str = HF_REPO, revision: str = "main",
                endpoint: str | None = None, sha256: str | None = None, progress: bool = True) -> Path:
    """huggingface_hub resolves the file (HEAD on /datasets/{repo}/resolve/{revision}/{file}: commit, ETag, size,
    CDN redirect); the bytes then come through http_download, pinned to that commit. Not hf_hub_download itself:
    it deletes a partial file when a transfer fails, and a 10 GB file must survive a dropped connection or a
    Ctrl-C. An LFS file's ETag is its sha256, which is checked."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
    url = hf_hub_url(repo, filename, repo_type="dataset", revision=revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint)
    except Exception as e:  # the hub client's HTTP and network errors alike: one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 404:
            first = f"HTTP 404: no such file in {repo} at {revision}"
        raise MiniMindError(f"{url}: cannot resolve ({first})") from None
    if not meta.commit_hash or not meta.etag:
        raise MiniMindError(f"{url}: the server is not a Hugging Face Hub endpoint (no X-Repo-Commit / ETag); "
                            "check HF_ENDPOINT")
    pinned = hf_hub_url(repo, filename, repo_type="dataset", revision=meta.commit_hash, endpoint=endpoint)
    source = meta.location if meta.location and meta.location != url else pinned
    expected = sha256 or (meta.etag if len(meta.etag) == 64 else None)
    dest = Path(out_dir) / filename
    if dest.is_file() and not _partial(dest).exists() and dest.stat().st_size == meta.size and \
            (expected is None or sha256_of(dest) == expected.lower()):
        return dest  # already here and intact
    return http_download(source, dest, sha256=expected, size=meta.size, tag=meta.etag, progress=progress)


# ---- ModelScope (plain HTTP with resume) -----------------------------------------------------------------


def modelscope_url(filename: str, repo: str = MS_REPO, revision: str = "master", endpoint: str | None = None) -> str:
    endpoint = (endpoint or os.environ.get("MODELSCOPE_ENDPOINT") or MS_ENDPOINT).rstrip("/")
    return (f"{endpoint}/api/v1/datasets/{repo}/repo?Revision={quote(revision, safe='')}"
            f"&FilePath={quote(filename, safe='')}")


def _partial(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def http_download(url: str, dest: str | Path, sha256: str | None = None, size: int | None = None,
                  tag: str | None = None, retries: int = 5, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download url to dest via dest.part: an interrupted download (dropped connection, Ctrl-C, a crash)
    continues from the bytes already there with a Range request, in this call or the next one. `tag` (an
    ETag) is kept beside the partial file, so that a new version of the file is never appended to an old one."""
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _partial(dest)
    tag_file = part.with_name(part.name + ".etag")
    if tag is not None:
        if part.exists() and (not tag_file.is_file() or tag_file.read_text().strip() != tag):
            part.unlink()  # a partial download of another version
        tag_file.write_text(tag + "\n")
    total: int | None = size
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have >= size:
            break
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status == 200:
                    have = 0  # the server ignored the Range: start again
                length = response.headers.get("Content-Length")
                span = response.headers.get("Content-Range")
                if span and "/" in span and span.rsplit("/", 1)[1].isdigit():
                    total = int(span.rsplit("/", 1)[1])
                elif length is not None:
                    total = have + int(length)
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                        disable=not progress, leave=False) as bar:
                    while block := response.read(CHUNK):
                        f.write(block)
                        bar.update(len(block))
        except urllib.error.HTTPError as e:
            if e.code == 416 and have and total in (None, have):  # Range past the end: the file is all here
                break
            if e.code < 500 and e.code not in (408, 429):
                raise MiniMindError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, HTTPException, ConnectionError, TimeoutError) as e:
            if attempt == retries:
                got = part.stat().st_size if part.exists() else 0
                raise MiniMindError(f"{url}: download interrupted at {got:,} bytes ({e}); run the same command "
                                    "again to resume") from None
        got = part.stat().st_size if part.exists() else 0
        if total is not None and got >= total:
            break
        if attempt == retries:
            raise MiniMindError(f"{url}: download stopped at {got:,} of {total or '?'} bytes; run the same "
                                "command again to resume")
        time.sleep(min(2.0 ** attempt * 0.1, 5.0))  # a dropped connection: resume after a short pause
    os.replace(part, dest)
    tag_file.unlink(missing_ok=True)
    verify(dest, size if size is not None else total, sha256)
    return dest


# ---- entry point ---------------------------------------------------------------------------------------


def download(name: str, out_dir: str | Path, source: str = "hf", endpoint: str | None = None,
             revision: str | None = None, progress: bool = True, sha256: str | None = None) -> Path:
    """Download one of MiniMind's dataset files into out_dir; returns its path. A complete file that is
    already there (and matches) is not fetched again."""
    entry = resolve(name)
    sha256 = sha256 or entry.sha256
    if source == "hf":
        return download_hf(entry.filename, out_dir, revision=revision or "main", endpoint=endpoint, sha256=sha256,
                           progress=progress)
    if source == "modelscope":
        if not entry.modelscope:
            raise MiniMindError(f"{entry.filename} is published on the Hugging Face Hub only; use --source hf")
        dest = Path(out_dir) / entry.filename
        if dest.is_file() and not _partial(dest).exists() and \
                (sha256 is None or sha256_of(dest) == sha256.lower()):
            return dest
        url = modelscope_url(entry.filename, revision=revision or "master", endpoint=endpoint)
        return http_download(url, dest, sha256=sha256, progress=progress)
    raise MiniMindError(f"unknown source {source!r}; choose {' or '.join(SOURCES)}")
