"""Tokenize-and-pack tests: rows against the unpacked token stream and encode_chat, workers=2 against
workers=1 byte for byte, the cache, bad lines, augmentations and crash safety. `pytest tests/test_pack.py`."""

import json
import os
import pickle
import random
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import CORPUS
from tokenizers import Tokenizer, models

import minimind.data.pack_workers as packing
from minimind import MiniMindError
from minimind.chat import EMPTY_THINK, encode_chat, render
from minimind.data.formats import iter_rows
from minimind.data.pack import PackedDataset, pack
from minimind.data.pack_workers import SYSTEM_PROMPTS

ADD_TOOL = {"type": "function", "function": {"name": "add", "description": "add two numbers",
                                             "parameters": {"type": "object", "properties": {"a": {}, "b": {}}}}}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def pretrain_rows(n=200, seed=0):
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choices(CORPUS, k=rng.randint(1, 4)))} for _ in range(n)]


def conversations(n=40, seed=0):
    """Plain, system, multi-turn, reasoning and tool-calling conversations (MiniMind's JSON-string style)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q, a, b = (rng.choice(CORPUS)[: rng.randint(10, 60)] for _ in range(3))
        shape = i % 5
        if shape == 0:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        elif shape == 1:
            msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                    {"role": "assistant", "content": a}]
        elif shape == 2:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                    {"role": "user", "content": b}, {"role": "assistant", "content": q}]
        elif shape == 3:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a, "reasoning_content": b}]
        else:
            msgs = [{"role": "system", "content": "", "tools": json.dumps([ADD_TOOL])},
                    {"role": "user", "content": "3 + 4 = ?"},
                    {"role": "assistant", "content": "", "tool_calls": json.dumps([{"name": "add",
                                                                                    "arguments": {"a": 3, "b": 4}}])},
                    {"role": "tool", "content": '{"result": 7}'},
                    {"role": "assistant", "content": a}]
        rows.append({"conversations": msgs})
    return rows


def has_tools(row):
    return any("tools" in m for m in row["conversations"])


def rows_of(ds):
    return [ds[i] for i in range(len(ds))]


def same_files(a: PackedDataset, b: PackedDataset):
    names = ["ids.bin", "index.npy"] + (["mask.bin"] if a.kind == "sft" else [])
    return all((a.path / n).read_bytes() == (b.path / n).read_bytes() for n in names)


# ---------------------------------------------------------------------------------------------- pretrain


def test_pretrain_rows_are_the_document_stream_cut_to_seq_len(tokenizer, tmp_path):
    rows = pretrain_rows()
    src = write_jsonl(tmp_path / "pre.jsonl", rows)
    ds = pack(src, tokenizer, "pretrain", 64, cache_dir=tmp_path / "cache", workers=1, progress=False)

    stream = []
    for r in rows:
        stream += [1, *tokenizer(r["text"], add_special_tokens=False)["input_ids"], 2]
    assert len(ds) == len(stream) // 64 > 10
    got = rows_of(ds)
    assert all(ids.dtype == np.int64 and len(ids) == 64 and mask is None for ids, mask in got)
    assert np.concatenate([ids for ids, _ in got]).tolist() == stream[: len(ds) * 64]
    s = ds.stats
    assert (s.documents, s.rows, s.tokens, s.loss_tokens) == (len(rows), len(ds), len(ds) * 64, len(ds) * 64)
    assert s.dropped_tokens == len(stream) - len(ds) * 64  # the final partial row: counted, not hidden
    assert ds[-1][0].tolist() == stream[(len(ds) - 1) * 64: len(ds) * 64]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_text_file_documents_as_formats_reads_them(tokenizer, tmp_path):
    src = tmp_path / "plain.txt"
    src.write_text("\n\n".join(CORPUS * 10) + "\n", encoding="utf-8")
    ds = pack(src, tokenizer, "pretrain", 32, cache_dir=tmp_path / "cache", workers=2, progress=False)
    stream = []
    for _, row in iter_rows(src, "pretrain"):
        stream += [1, *tokenizer(row["text"], add_special_tokens=False)["input_ids"], 2]
    assert ds.stats.documents == 40
    assert np.concatenate([ids for ids, _ in rows_of(ds)]).tolist() == stream[: len(ds) * 32]


# ---------------------------------------------------------------------------------------------- sft


def test_sft_rows_are_encode_chat_truncated_and_counted(tokenizer, tmp_path):
    rows = conversations()
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    seq_len = 120
    ds = pack(src, tokenizer, "sft", seq_len, cache_dir=tmp_path / "cache", workers=1, progress=False)

    expected = [encode_chat(tokenizer, r) for r in rows]
    assert len(ds) == len(rows)
    long = [len(ids) for ids, _ in expected if len(ids) > seq_len]
    assert 0 < len(long) < len(rows)  # the test data must exercise both cases
    for (ids, mask), (want_ids, want_mask) in zip(rows_of(ds), expected):
        assert ids.dtype == np.int64 and mask.dtype == np.uint8
        assert ids.tolist() == want_ids[:seq_len] and mask.tolist() == want_mask[:seq_len]
    s = ds.stats
    assert s.truncated == len(long) and s.dropped_tokens == sum(n - seq_len for n in long)
    assert s.loss_tokens == sum(sum(m[:seq_len]) for _, m in expected)
    assert s.tokens == sum(min(len(i), seq_len) for i, _ in expected)
    assert s.longest == max(len(i) for i, _ in expected)


def test_workers_2_is_byte_identical_to_workers_1(tokenizer, tmp_path):
    aug = dict(seed=3, system_prompt_prob=0.5, keep_empty_think_prob=0.2, chunk_bytes=2048)
    for kind, rows, seq_len in (("pretrain", pretrain_rows(300), 48), ("sft", conversations(60), 96)):
        src = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
        one, two = (pack(src, tokenizer, kind, seq_len, cache_dir=tmp_path / f"c{w}", workers=w, progress=False,
                         **aug) for w in (1, 2))
        assert len(one) == len(two) > 0 and same_files(one, two), kind
        assert one.stats.tokens == two.stats.tokens and one.path.name == two.path.name


# ---------------------------------------------------------------------------------------------- augmentation


def test_augmentations_are_seeded_and_spare_tool_conversations(tokenizer, tmp_path):
    rows = conversations(60)
    src = write_jsonl(tmp_path / "sft.jsonl", rows)

    def packed(seed, cache):
        return pack(src, tokenizer, "sft", 4096, cache_dir=tmp_path / cache, workers=1, progress=False, seed=seed,
                    system_prompt_prob=0.5, keep_empty_think_prob=1.0)

    a, b, c = packed(0, "a"), packed(0, "b"), packed(1, "c")
    assert a.path != b.path and same_files(a, b)  # same seed, built twice: the same rows
    assert not same_files(a, c)
    added = 0
    for row, (ids, mask) in zip(rows, rows_of(a)):
        plain = encode_chat(tokenizer, row)
        if has_tools(row) or row["conversations"][0]["role"] == "system":
            assert (ids.tolist(), mask.tolist()) == plain  # never a second system prompt, never on tool rows
            continue
        options = [encode_chat(tokenizer, [{"role": "system", "content": p}, *row["conversations"]])
                   for p in SYSTEM_PROMPTS]
        assert (ids.tolist(), mask.tolist()) in options + [plain]
        added += (ids.tolist(), mask.tolist()) != plain
    assert 5 < added < 31  # 36 eligible rows at p=0.5


def test_dropping_empty_think_keeps_the_mask_on_the_answer(tokenizer, tmp_path):
    rows = conversations(30)
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    ds = pack(src, tokenizer, "sft", 4096, cache_dir=tmp_path / "cache", workers=1, progress=False,
              keep_empty_think_prob=0.0)
    for row, (ids, mask) in zip(rows, rows_of(ds)):
        text = render(row)
        assert (EMPTY_THINK in text) != ("reasoning_content" in row["conversations"][-1])
        assert ids.tolist() == tokenizer(text.replace(EMPTY_THINK, ""), add_special_tokens=False)["input_ids"]
        # loss on exactly each assistant turn's body and its <|im_end|>, now without the empty block
        bodies = [part.split("<|im_end|>")[0] + "<|im_end|>" for part in text.split("<|im_start|>assistant\n")[1:]]
        want = "".join(b.replace(EMPTY_THINK, "") for b in bodies)
        assert tokenizer.decode(ids[mask == 1].tolist()) == want
    reasoning = [i for i, r in enumerate(rows) if "reasoning_content" in r["conversations"][-1]]
    assert reasoning and all(b"<think>" in tokenizer.decode(ds[i][0].tolist()).encode() for i in reasoning)


# ---------------------------------------------------------------------------------------------- cache


def test_second_call_is_a_cache_hit_and_a_changed_source_a_miss(tokenizer, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "pre.jsonl", pretrain_rows())
    first = pack(src, tokenizer, "pretrain", 64, cache_dir=tmp_path, workers=1, progress=False)
    stamp = (first.path / "ids.bin").stat().st_mtime_ns

    class NoTokenizing:
        def __init__(self, plan):
            raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(packing, "_Packer", NoTokenizing)
        again = pack(src, tokenizer, "pretrain", 64, cache_dir=tmp_path, workers=1, progress=False)
        by_dir = pack(src, tokenizer.name_or_path, "pretrain", 64, cache_dir=tmp_path, workers=1, progress=False)
    assert again.path == by_dir.path == first.path and (again.path / "ids.bin").stat().st_mtime_ns == stamp
    assert rows_of(again)[3][0].tolist() == rows_of(first)[3][0].tolist()

    write_jsonl(src, pretrain_rows() + pretrain_rows(50, seed=1))
    changed = pack(src, tokenizer, "pretrain", 64, cache_dir=tmp_path, workers=1, progress=False)
    assert changed.path != first.path and len(changed) > len(first)
    other_len = pack(src, tokenizer, "pretrain", 32, cache_dir=tmp_path, workers=1, progress=False)
    assert other_len.path != changed.path
    assert not list(tmp_path.glob(".tmp-*"))


def test_dataset_pickles_as_a_path(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "sft.jsonl", conversations(10))
    ds = pack(src, tokenizer, "sft", 256, cache_dir=tmp_path, workers=1, progress=False)
    blob = pickle.dumps(ds)
    assert len(blob) < 4096  # dataloader workers reopen the maps instead of receiving the data
    back = pickle.loads(blob)
    assert len(back) == len(ds) and all(np.array_equal(x, y) for x, y in zip(back[4], ds[4]))


# ---------------------------------------------------------------------------------------------- bad lines


def bad_file(path):
    lines = [json.dumps(r, ensure_ascii=False) for r in pretrain_rows(60)]
    lines[2] = '{"text": "unterminated'
    lines[40] = '{"txt": "wrong field"}'
    lines.insert(10, "")  # blank lines are not rows, but they count as lines
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_names_file_and_line_and_leaves_no_cache(tokenizer, tmp_path, workers):
    src = bad_file(tmp_path / "pre.jsonl")
    cache = tmp_path / "cache"
    with pytest.raises(MiniMindError, match=r"pre\.jsonl:3: invalid JSON.*--skip-bad"):
        pack(src, tokenizer, "pretrain", 64, cache_dir=cache, workers=workers, progress=False, chunk_bytes=1024)
    assert list(cache.iterdir()) == []  # no finished cache, no temporary directory

    ds = pack(src, tokenizer, "pretrain", 64, cache_dir=cache, workers=workers, progress=False, chunk_bytes=1024,
              skip_bad=True)
    assert ds.stats.skipped_bad == 2 and ds.stats.documents == 58
    assert ds.meta["bad_lines"][1].endswith("pre.jsonl:42: missing field 'text'")
    # the cache built by skipping must not let a later strict call pass silently
    with pytest.raises(MiniMindError, match=r"pre\.jsonl:3: invalid JSON"):
        pack(src, tokenizer, "pretrain", 64, cache_dir=cache, workers=workers, progress=False)


def test_crash_mid_pack_leaves_no_cache(tokenizer, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "pre.jsonl", pretrain_rows(300))
    real = packing._Packer.__call__

    def crash_on_third(self, job):
        if job.number == 2:
            raise RuntimeError("disk on fire")
        return real(self, job)

    monkeypatch.setattr(packing._Packer, "__call__", crash_on_third)
    with pytest.raises(RuntimeError, match="disk on fire"):
        pack(src, tokenizer, "pretrain", 64, cache_dir=tmp_path / "cache", workers=1, progress=False, chunk_bytes=2048)
    assert list((tmp_path / "cache").iterdir()) == []


def test_builds_abandoned_by_killed_processes_are_removed(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "pre.jsonl", pretrain_rows(20))
    name = pack(src, tokenizer, "pretrain", 64, cache_dir=tmp_path / "c", workers=1, progress=False).path.name
    shutil.rmtree(tmp_path / "c" / name)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    abandoned = tmp_path / "c" / f".tmp-{name}-{host}-{dead.pid}-abc_123"
    running = tmp_path / "c" / f".tmp-{name}-{host}-{os.getpid()}-abc_456"  # a live process's build stays
    for d in (abandoned, running):
        (d / "shards").mkdir(parents=True)
    pack(src, tokenizer, "pretrain", 64, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert not abandoned.exists() and running.exists()


# ---------------------------------------------------------------------------------------------- errors


def test_user_errors(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "pre.jsonl", pretrain_rows(5))
    with pytest.raises(MiniMindError, match="kind must be one of pretrain, sft"):
        pack(src, tokenizer, "dpo", 64, cache_dir=tmp_path)
    with pytest.raises(MiniMindError, match="no such file"):
        pack(tmp_path / "missing.jsonl", tokenizer, "pretrain", 64, cache_dir=tmp_path)
    with pytest.raises(MiniMindError, match="between 0 and 1"):
        pack(src, tokenizer, "sft", 64, cache_dir=tmp_path, system_prompt_prob=1.5)
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<|im_start|>"], vocab["<|im_end|>"] = 70_000, 70_001
    big = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    with pytest.raises(MiniMindError, match="uint16"):
        pack(src, big, "pretrain", 64, cache_dir=tmp_path)


def test_deeply_nested_line_names_file_and_line_or_is_skipped(tokenizer, tmp_path):
    src = tmp_path / "deep.jsonl"
    write_jsonl(src, conversations(3))
    with src.open("a") as f:
        f.write('{"conversations": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(MiniMindError, match=r"deep.jsonl:4: invalid JSON: arrays or objects nested too deeply"):
        pack(src, tokenizer, "sft", 64, cache_dir=tmp_path / "c1", workers=1, progress=False)
    ds = pack(src, tokenizer, "sft", 64, cache_dir=tmp_path / "c2", workers=1, progress=False, skip_bad=True)
    assert (len(ds), ds.stats.skipped_bad) == (3, 1)


def test_empty_file_is_a_clear_error(tokenizer, tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_bytes(b"")
    for kind in ("pretrain", "sft"):
        with pytest.raises(MiniMindError, match=r"empty.jsonl: the file is empty"):
            pack(src, tokenizer, kind, 64, cache_dir=tmp_path, progress=False)


def test_a_huge_line_is_cut_before_it_is_tokenized(tokenizer, tmp_path, monkeypatch):
    import tracemalloc

    # Letters, digits, spaces, punctuation, CJK and special tokens, in a few MB: the pieces must tokenize to
    # exactly the whole text's tokens, or the row and the counts would differ from encoding then truncating.
    rng = random.Random(5)
    words = [w for line in CORPUS for w in line.split()] + ["x2y", "don't", "3.14", "中文", "<|im_end|>"]
    user = " ".join(rng.choices(words, k=400_000))
    conv = [{"role": "user", "content": "Summarise."}, {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": user}, {"role": "assistant", "content": "ok"}]
    src = write_jsonl(tmp_path / "huge.jsonl", [{"conversations": conv}])
    assert src.stat().st_size > 2_000_000
    want_ids, want_mask = encode_chat(tokenizer, conv)
    for seq_len, piece in ((64, packing.PIECE_CHARS), (3000, 1000)):  # the second spans many pieces
        monkeypatch.setattr(packing, "PIECE_CHARS", piece)
        tracemalloc.start()
        ds = pack(src, tokenizer, "sft", seq_len, cache_dir=tmp_path / str(seq_len), workers=1, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        ids, mask = ds[0]
        assert ids.tolist() == want_ids[:seq_len] and mask.tolist() == want_mask[:seq_len]
        assert (ds.stats.longest, ds.stats.dropped_tokens) == (len(want_ids), len(want_ids) - seq_len)
        # The text itself is held a few times over; its million-odd token ids and offsets (about 100 bytes
        # each as Python objects) must never be.
        assert peak < 12 * src.stat().st_size, peak


def test_a_huge_pretrain_document_is_tokenized_in_pieces(tokenizer, tmp_path, monkeypatch):
    import tracemalloc

    # Pieces of 1,000 characters and a flush every 5,000: the rows must still be the whole document's tokens,
    # and its several hundred thousand tokens must never be Python objects all at once.
    monkeypatch.setattr(packing, "PIECE_CHARS", 1000)
    monkeypatch.setattr(packing, "ENCODE_BATCH_CHARS", 5000)
    rng = random.Random(6)
    words = [w for line in CORPUS for w in line.split()] + ["x2y", "don't", "3.14", "中文"]
    docs = [{"text": "short one"}, {"text": " ".join(rng.choices(words, k=300_000))}, {"text": "short two"}]
    src = write_jsonl(tmp_path / "pre.jsonl", docs)
    tracemalloc.start()
    ds = pack(src, tokenizer, "pretrain", 64, cache_dir=tmp_path / "cache", workers=1, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    encoded = [tokenizer(d["text"], add_special_tokens=False)["input_ids"] for d in docs]
    stream = [t for ids in encoded for t in (1, *ids, 2)]
    assert np.concatenate([ds[i][0] for i in range(len(ds))]).tolist() == stream[: len(ds) * 64]
    assert (ds.stats.documents, ds.stats.longest) == (3, len(encoded[1]) + 2)
    assert ds.stats.tokens + ds.stats.dropped_tokens == len(stream)
    assert peak < 8 * src.stat().st_size, peak
