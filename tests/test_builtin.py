"""Built-in data tests: the chatterbot YAML reader, text cleaning, and the files write_builtin produces (valid,
renderable, clean, deterministic, held-out data kept out of training). `pytest tests/test_builtin.py`."""

import json
import re
from collections import Counter

import pytest

from minimind.chat import render
from minimind.data.builtin import (
    chatterbot_conversations,
    clean_text,
    parse_corpus_yaml,
    strip_gutenberg,
    write_builtin,
    write_pretrain_jsonl,
)
from minimind.data.formats import parse_row
from minimind.data.tasks import question_of

SMALL = dict(pretrain_chars=200_000, pretrain_val_chars=20_000, sft_tasks=300, val_tasks=30, heldout_tasks=60,
             rl_tasks=50, dpo_pairs=40)
KINDS = {"pretrain": "pretrain", "pretrain_val": "pretrain", "sft": "sft", "sft_val": "sft", "tasks_heldout": "rl",
         "rl": "rl", "dpo": "dpo", "dpo_val": "dpo"}

CORPUS = """categories:
- greetings
conversations:
- - Hello
  - Hi there
- - 'It''s a
    long line'
  - "say \\"hi\\"\\tnow"
  - plain text that
    continues here
- - can you write code?
  - |
    Sure:

        x = 1
- In a game of bingo, what is "two little ducks"?
  - '22'

- - 你好
  - 你好吗?
"""


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    return write_builtin(out, seed=0, **SMALL)


def test_parse_corpus_yaml():
    assert parse_corpus_yaml(CORPUS) == [
        ["Hello", "Hi there"],
        ["It's a long line", 'say "hi"\tnow', "plain text that continues here"],
        ["can you write code?", "Sure:\n\n    x = 1"],
        ['In a game of bingo, what is "two little ducks"?', "22"],
        ["你好", "你好吗?"],
    ]


def test_chatterbot_conversations_alternate():
    conversations = list(chatterbot_conversations())
    assert len(conversations) > 2000
    for messages in conversations:
        assert len(messages) % 2 == 0
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert all(m["content"] and m["content"] == m["content"].strip() for m in messages)
        assert not any(re.search(r"who are you|chatterbot|你是谁", m["content"], re.I) for m in messages)
    assert any(re.search(r"[\u4e00-\u9fff]", m[0]["content"]) for m in conversations)
    assert any(len(m) > 2 for m in conversations)


def test_clean_text():
    assert clean_text("a<br>b &amp; <b>c</b>&#160;d") == "a\nb & c d"
    assert clean_text("\x1b[31mred\x1b[0m and [1;32mgreen[0m") == "red and green"
    code = "function identity<T>(arg: T) and <孩子慢慢来>"
    assert clean_text(code) == code
    assert clean_text("one  two\n\n\n\n  three") == "one two\n\n  three"


def test_strip_gutenberg():
    text = ("The Project Gutenberg EBook of Hamlet\n\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n"
            "ACT I.\n\nWho's there?\n\nThis etext was produced by volunteers.\n\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nLicence: Project Gutenberg-tm ...")
    assert strip_gutenberg(text).strip() == "ACT I.\n\nWho's there?"
    assert strip_gutenberg("Nothing to strip.\n\nAt all.") == "Nothing to strip.\n\nAt all."


def test_preference_pairs_come_from_disjoint_tasks(written):
    train, val = read(written["dpo"]), read(written["dpo_val"])
    assert {r["kind"] for r in train if "kind" in r} == {"repetition"} and any("kind" not in r for r in train)
    # Held-out pairs ask held-out questions only.
    assert not {question_of({"conversations": r["chosen"]}) for r in train} & {
        question_of({"conversations": r["chosen"]}) for r in val}


def test_files_are_valid_and_render(written):
    assert set(written) == set(KINDS)
    for name, path in written.items():
        rows = read(path)
        assert rows, name
        for row in rows:
            parse_row(row, KINDS[name])
            if "conversations" in row:
                render(row["conversations"])
            for side in ("chosen", "rejected"):
                if side in row:
                    render(row[side])
    sft = read(written["sft"])
    assert {r.get("task") for r in sft} == {None, "arithmetic", "counting", "units", "identity", "calculator",
                                                "converter"}
    assert not any("answer" in r for r in sft)  # so `minimind data check` reads it as SFT, not RL
    assert all("answer" in r for r in read(written["tasks_heldout"]))


def test_pretrain_text_is_clean(written):
    texts = [r["text"] for name in ("pretrain", "pretrain_val") for r in read(written[name])]
    joined = "\n".join(texts)
    assert 150_000 < len(joined) < 300_000
    for bad in ("Project Gutenberg", "*** START", "*** END", "\x1b", "&nbsp;", "&#160;", "<br"):
        assert bad not in joined, bad
    assert not re.search(r"[\u4e00-\u9fff]/[a-zA-Z]{1,3}\b", joined)  # part-of-speech tags
    assert not re.search(r"[０-９]", joined)  # full-width digits, made ASCII
    assert not re.search(r"\][a-z]{1,3}", joined.replace("[", ""))  # compound tags like [中央/n 电视台/n]nt
    zh = sum(len(t) for t in texts if re.search(r"[\u4e00-\u9fff]", t))
    assert 0.3 < zh / len(joined) < 0.7


def test_held_out_data_stays_out_of_training(written):
    train_docs = {r["text"] for r in read(written["pretrain"])}
    assert not train_docs & {r["text"] for r in read(written["pretrain_val"])}
    sft_questions = {m["content"] for r in read(written["sft"]) for m in r["conversations"] if m["role"] == "user"}
    for name in ("tasks_heldout", "sft_val"):
        held = [r for r in read(written[name]) if "task" in r]
        assert held and not sft_questions & {question_of(r) for r in held}, name


def test_deterministic_for_a_seed(written, tmp_path):
    again = write_builtin(tmp_path / "again", seed=0, **SMALL)
    for name, path in written.items():
        assert path.read_bytes() == again[name].read_bytes(), name
    other = write_builtin(tmp_path / "other", seed=1, **SMALL)
    assert other["sft"].read_bytes() != written["sft"].read_bytes()


def test_write_pretrain_jsonl_still_interleaves(tmp_path):
    rows = write_pretrain_jsonl(tmp_path / "p.jsonl", max_chars=50_000)
    texts = [r["text"] for r in read(tmp_path / "p.jsonl")]
    assert rows == len(texts) > 2
    assert any(re.search(r"[\u4e00-\u9fff]", t) for t in texts) and any(t.isascii() for t in texts)


def test_cli_families_weights_the_task_mix_and_names_an_unknown_family(tmp_path, capsys):
    from minimind import cli

    args = ["data", "builtin", "--out", str(tmp_path), "--pretrain-chars", "20000", "--sft-tasks", "90",
            "--heldout-tasks", "30"]
    assert cli.main([*args, "--families", "arithmetic,arithmetic,calculator"]) == 0
    # Families are taken in turn, then the tasks are shuffled across the files: about two to one in each.
    rows = [json.loads(line) for name in ("sft.jsonl", "rl.jsonl")
            for line in (tmp_path / name).read_text(encoding="utf-8").splitlines()]
    tasks = Counter(r["task"] for r in rows if "task" in r)
    assert tasks.keys() == {"arithmetic", "calculator"} and 1.7 < tasks["arithmetic"] / tasks["calculator"] < 2.3
    assert cli.main([*args, "--families", "arithmetic,sums"]) != 0
    assert "unknown task family 'sums'" in capsys.readouterr().err
