"""Data cleaning: near-duplicate precision and recall on planted duplicates, each rule on rows that must pass and
rows that must fail, decontamination, worker-count independence, malformed lines, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minimind import MiniMindError
from minimind.data.clean import clean
from minimind.data.dedup import normalize, planted_corpus, token_hashes
from minimind.data.parallel import byte_ranges
from minimind.data.quality import (
    c4_verdict,
    drop_boilerplate,
    gopher_verdict,
    load_rules,
    script_verdict,
    scrub_pii,
    sft_verdict,
)

RULES = load_rules()
DEDUP_ONLY = """
[pii]
enabled = false
[c4]
enabled = false
[script]
enabled = false
[gopher]
enabled = false
"""


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _removed(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "removed.jsonl").read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------- deduplication


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_near_duplicates_found_with_precision_and_recall(tmp_path: Path, lang: str) -> None:
    texts, groups = planted_corpus(600, lang, near_rates=(0.005, 0.01), seed=3)
    src = _write(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    config = tmp_path / "dedup.toml"
    config.write_text(DEDUP_ONLY)
    report = clean([src], tmp_path / "out", config=config, workers=1)
    removed = {r["line"] - 1 for r in _removed(tmp_path / "out")}
    seen: set[int] = set()
    should = set()  # every row but the first of its group
    for i, g in enumerate(groups):
        if g in seen:
            should.add(i)
        seen.add(g)
    assert len(should) > 100 and len(set(groups)) < len(groups)
    true_positives = len(removed & should)
    precision, recall = true_positives / len(removed), true_positives / len(should)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert report.rows_out == len(texts) - len(removed)
    # Each removed row names the kept row of its cluster, which is in the same group.
    for r in _removed(tmp_path / "out"):
        if r["line"] - 1 in should:
            kept = int(r["cluster"].rsplit(":", 1)[1]) - 1
            assert groups[kept] == groups[r["line"] - 1]


def test_sft_rows_are_deduplicated_on_user_and_assistant_text(tmp_path: Path) -> None:
    talk = [{"role": "user", "content": "How many legs does a spider have? Tell me about it please."},
            {"role": "assistant", "content": "A spider has eight legs, two more than an insect has."}]
    rows = [{"conversations": talk},
            {"conversations": [{"role": "system", "content": "You are a helpful assistant."}] + talk},
            {"conversations": [talk[0], {"role": "assistant", "content": "Spiders have six legs."}]}]
    report = clean([_write(tmp_path / "sft.jsonl", rows)], tmp_path / "out", workers=1)
    assert report.kind == "sft" and report.rows_out == 2
    assert [(r["line"], r["rule"], r["cluster"]) for r in _removed(tmp_path / "out")] == \
        [(2, "exact-dup", f"{tmp_path / 'sft.jsonl'}:1")]


# ---------------------------------------------------------------------------------------------- rules


def _gopher(text: str):
    toks = normalize(text)
    return gopher_verdict(text, toks, token_hashes(toks), RULES["gopher"])


PROSE = ("The river ran past the old mill and the children watched the water turn the wheel. "
         "It was late in the summer, and the fields beyond the town were gold with wheat that had not been cut. "
         "Their grandmother told them that the mill had stood there for two hundred years. ") * 1
ZH = "今天的天气很好，我们一起去公园散步。公园里有很多人在锻炼身体，孩子们在草地上玩耍，老人们坐在长椅上聊天。"


@pytest.mark.parametrize("text,rule", [
    (PROSE, None),
    (ZH, None),
    ("Too short.", "gopher-words"),
    ("a b c d e f g h i j k l m n o p q r s t the and", "gopher-word-length"),
    ("the #weather and the #news #today #sunny #warm #happy #friday #weekend", "gopher-symbols"),
    ("- the first item\n- and the second\n- the third one\n- with the last", "gopher-bullets"),
    ("the story of the old house goes on and on into the night...\nand the other one was told by the fire in "
     "winter...\nthe end of the tale is near and the children are asleep...\nthe cat sat down.", "gopher-ellipsis"),
    ("the 123 456 789 012 345 678 and 901 234 567 890 123", "gopher-alpha"),
    ("Lorem words written here without any common function words present anywhere", "gopher-stop-words"),
    ("\n".join(["the same line is here again"] * 5 + [PROSE]), "gopher-dup-lines"),
    (" ".join(["the cat and the dog"] * 30), "gopher-top-ngram"),
    (PROSE + "Later that evening the family walked along the road to the village, where the baker was closing "
     "his shop and the lamps were being lit one by one. " + " ".join(["a long run of words that will come back "
                                                                      "again and again"] * 4), "gopher-dup-ngrams"),
])
def test_gopher_rules(text: str, rule: str | None) -> None:
    verdict = _gopher(text)
    assert (verdict and verdict[0]) == rule, verdict


def test_c4_rules() -> None:
    c4 = RULES["c4"]
    assert c4_verdict(PROSE, c4) is None
    assert c4_verdict("Lorem ipsum dolor sit amet, the text goes on.", c4)[0] == "c4-lorem-ipsum"
    assert c4_verdict("a heading\nanother heading\nthird line without end\nfourth\nfifth", c4)[0] == "c4-punctuation"
    assert c4_verdict("一行没有句号的评论", c4) is None  # one line: too short to judge by its lines
    text, dropped = drop_boilerplate("The story begins here.\nThis site uses cookies to improve.\nIt ends.", c4)
    assert (text, dropped) == ("The story begins here.\nIt ends.", 1)


def test_script_rule() -> None:
    rules = RULES["script"]
    assert script_verdict(PROSE, rules) is None and script_verdict(ZH, rules) is None
    assert script_verdict("12345 67890", rules) is None
    verdict = script_verdict("Это предложение написано на русском языке и его следует удалить.", rules)
    assert verdict[0] == "script" and "cyrillic" in verdict[1]


def test_pii_scrub() -> None:
    pii = RULES["pii"]
    text, n = scrub_pii("Mail jane.doe@example.com or call 138 1234 5678, +1 (415) 555-2671 or (212) 555-0100; "
                        "server 192.168.1.20. Version 1.2.3, year 2024, price 12.50.", pii)
    assert n == 5
    assert text == ("Mail [EMAIL] or call [PHONE], [PHONE] or [PHONE]; server [IP]. Version 1.2.3, year 2024, "
                    "price 12.50.")


@pytest.mark.parametrize("messages,rule", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], None),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "sft-empty-assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": '[{"name": "x"'}],
     "sft-bad-tool-call"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": '<tool_call>{"name": }</tool_call>'}],
     "sft-bad-tool-call"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>hmm, so the answer"}],
     "sft-unclosed-think"),
    ([{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y" * 60}], "sft-too-long"),
])
def test_sft_rules(messages: list, rule: str | None) -> None:
    verdict = sft_verdict(messages, {**RULES["sft"], "max_chars": 100}, None)
    assert (verdict and verdict[0]) == rule, verdict


def test_sft_token_budget() -> None:
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert sft_verdict(talk, RULES["sft"], 9000)[0] == "sft-too-long"
    assert sft_verdict(talk, RULES["sft"], 100) is None


def test_bad_settings_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gopher]\nmin_wrds = 3\n")
    with pytest.raises(MiniMindError, match=r"bad.toml: unknown setting 'gopher.min_wrds'"):
        load_rules(bad)
    bad.write_text("[dedup]\nthreshold = \"high\"\n")
    with pytest.raises(MiniMindError, match=r"dedup.threshold must be a float"):
        load_rules(bad)


# ---------------------------------------------------------------------------------------------- decontamination

QUESTION = ("Which of the following best explains why the boiling point of water decreases as the altitude above "
            "sea level increases in mountain regions")


@pytest.mark.parametrize("action", ["drop", "flag"])
def test_decontamination(tmp_path: Path, action: str) -> None:
    evals = _write(tmp_path / "mmlu.jsonl", [{"question": QUESTION, "choices": ["a", "b"], "answer": 0}])
    words = QUESTION.split()
    rows = [{"text": f"In class we read: {' '.join(words[3:18])}. Then we went home and the teacher smiled."},
            {"text": f"Notes: {' '.join(words[:8])} and other things the students discussed at length today."},
            {"text": PROSE}]
    config = tmp_path / "c.toml"
    config.write_text(DEDUP_ONLY + f'[decontaminate]\naction = "{action}"\n')
    report = clean([_write(tmp_path / "train.jsonl", rows)], tmp_path / "out", config=config, eval_files=[evals],
                   workers=1)
    hits = [json.loads(x) for x in (tmp_path / "out" / ("removed.jsonl" if action == "drop" else "flagged.jsonl"))
            .read_text().splitlines()]
    assert [h["rule"] for h in hits] == ["decontaminate"] and "mmlu.jsonl" in hits[0]["detail"]
    assert hits[0]["row"] == rows[0]
    assert report.rows_out == (2 if action == "drop" else 3)
    assert report.eval_items == 3 and report.eval_items_too_short == 2  # the choices are too short to check


# ---------------------------------------------------------------------------------------------- the run


def _mixed_corpus(tmp_path: Path, n: int = 400) -> Path:
    texts, _ = planted_corpus(n, "en", seed=5)
    rows = [json.dumps({"text": t + " The end of the story was told by the fire."}) for t in texts]
    rows[7] = '{"text": "a truncated line'
    rows[11] = '{"txt": "no text field here"}'
    return _write(tmp_path / "mixed.jsonl", rows)


def test_same_output_for_any_worker_count_and_malformed_lines(tmp_path: Path) -> None:
    src = _mixed_corpus(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text("[gopher]\nmin_stop_words = 0\n")
    one = clean([src], tmp_path / "one", config=config, workers=1, chunk_bytes=1 << 15)
    two = clean([src], tmp_path / "two", config=config, workers=2, chunk_bytes=1 << 15)
    for name in ("clean.jsonl", "removed.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert one.removed == two.removed and one.removed["near-dup"] > 10 and one.bad_lines == 2
    bad = [r for r in _removed(tmp_path / "one") if r["rule"] == "malformed"]
    assert [(r["line"], r["detail"]) for r in bad] == [(8, "invalid JSON: Unterminated string starting at at "
                                                           "column 10"), (12, 'missing field "text"')]
    with pytest.raises(MiniMindError, match=rf"{src}:8: invalid JSON"):
        clean([src], tmp_path / "strict", config=config, workers=1, strict=True)
    assert "| near-dup |" in (tmp_path / "one" / "report.md").read_text()
    assert (tmp_path / "one" / "lengths.png").stat().st_size > 1000


def test_parquet_input_cleans_like_jsonl(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, _ = planted_corpus(120, "zh", seed=2)
    src = _write(tmp_path / "zh.jsonl", [{"text": t} for t in texts])
    pq.write_table(pa.table({"text": texts}), tmp_path / "zh.parquet", row_group_size=50)
    config = tmp_path / "c.toml"
    config.write_text(DEDUP_ONLY)
    a = clean([src], tmp_path / "a", config=config, workers=1)
    b = clean([tmp_path / "zh.parquet"], tmp_path / "b", config=config, workers=1)
    assert a.removed == b.removed and a.removed["near-dup"] > 0
    assert [json.loads(x) for x in (tmp_path / "a" / "clean.jsonl").read_text().splitlines()] == \
        [json.loads(x) for x in (tmp_path / "b" / "clean.jsonl").read_text().splitlines()]
    assert [r["line"] for r in _removed(tmp_path / "a")] == [r["line"] for r in _removed(tmp_path / "b")]


def test_resume_after_kill_gives_the_same_output(tmp_path: Path) -> None:
    texts, _ = planted_corpus(1500, "en", seed=7)
    src = _write(tmp_path / "big.jsonl", [{"text": t + " The end of the story was told by the fire."} for t in texts])
    config = tmp_path / "c.toml"
    config.write_text("[gopher]\nmin_stop_words = 0\n")
    clean([src], tmp_path / "whole", config=config, workers=1, chunk_bytes=1 << 16)
    code = (f"from minimind.data.clean import clean; clean([{str(src)!r}], {str(tmp_path / 'cut')!r}, "
            f"config={str(config)!r}, workers=1, chunk_bytes=1 << 16)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()})
    work = tmp_path / "cut" / ".work"
    deadline = time.time() + 120
    while len(list(work.glob("*.json"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done, total = len(list(work.glob("*.json"))), len(byte_ranges(src, src.stat().st_size, 1 << 16))
    assert 3 <= done < total and not (tmp_path / "cut" / "clean.jsonl").exists()  # killed part-way
    report = clean([src], tmp_path / "cut", config=config, workers=1, chunk_bytes=1 << 16)
    assert report.resumed_parts == done
    for name in ("clean.jsonl", "removed.jsonl"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_line_numbers_count_blank_lines_across_pieces(tmp_path: Path) -> None:
    a, b = PROSE, ZH * 3
    src = tmp_path / "gaps.jsonl"
    src.write_text("\n".join([json.dumps({"text": a}), "", "", json.dumps({"text": a}), "",
                              json.dumps({"text": b}, ensure_ascii=False), json.dumps({"text": b}, ensure_ascii=False)])
                   + "\n", encoding="utf-8")
    config = tmp_path / "c.toml"
    config.write_text(DEDUP_ONLY)
    clean([src], tmp_path / "out", config=config, workers=1, chunk_bytes=1)  # every line a piece of its own
    assert [(r["line"], r["cluster"]) for r in _removed(tmp_path / "out")] == [(4, f"{src}:1"), (7, f"{src}:6")]
