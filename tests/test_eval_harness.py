"""The evaluation harness: multiple choice in each file layout against hand-computed log-likelihoods, GSM8K-style
exact match against a plain generate() reference, and `minimind eval` end to end. Run: .venv/bin/pytest
tests/test_eval_harness.py"""

import argparse
import csv
import json
import math

import pytest
import torch
from conftest import small_model

from minimind import MiniMindError
from minimind.chat import encode_chat
from minimind.checkpoint import save_model
from minimind.commands.eval import add_parser as add_eval_parser
from minimind.data.tasks import extract_answer, make_tasks
from minimind.eval.exact_match import evaluate_exact, read_qa
from minimind.eval.multiple_choice import evaluate_mc, loglikelihoods, read_mc, requests_for, shots_for
from minimind.eval.perplexity import score_texts
from minimind.eval.probes import probe_accuracy
from minimind.generation import SamplingParams, generate

CEVAL = """id,question,A,B,C,D,answer,explanation
0,今天天气很好，我们一起去公园,散步吧,跑步,读书,睡觉,A,
1,新华社北京电，国务院今天举行,新闻发布会,会议,演出,比赛,A,
2,这本书写得非常,好,坏,长,短,A,
"""
CMMLU = """,Question,A,B,C,D,Answer
0,To be or not to,be,go,see,run,A
1,The king is dead; long live the,king,queen,dog,light,A
"""
MMLU = """"What light through yonder window","breaks?","shines","falls","bends",A
"3 + 4 =","7","8","12","36",A
"""
ARC = [
    {"question": {"stem": "12 * 3 =", "choices": [{"text": "36", "label": "A"}, {"text": "7", "label": "B"},
                                                 {"text": "12", "label": "C"}]}, "answerKey": "A"},
    {"question": "The quick brown", "choices": {"text": ["fox", "king", "book"], "label": ["1", "2", "3"]},
     "answerKey": "2"},
]


@pytest.fixture
def mc_dir(tmp_path):
    d = tmp_path / "mc"
    d.mkdir()
    (d / "chinese_val.csv").write_text(CEVAL, encoding="utf-8")
    (d / "english.csv").write_text(CMMLU, encoding="utf-8")
    (d / "shakespeare_test.csv").write_text(MMLU, encoding="utf-8")
    (d / "arc.jsonl").write_text("\n".join(json.dumps(r) for r in ARC) + "\n", encoding="utf-8")
    return d


def test_reads_each_layout(mc_dir):
    items = read_mc(mc_dir)
    by_subject = {}
    for it in items:
        by_subject.setdefault(it.subject, []).append(it)
    assert sorted(by_subject) == ["arc", "chinese", "english", "shakespeare"]
    assert [len(by_subject[s]) for s in ("arc", "chinese", "english", "shakespeare")] == [2, 3, 2, 2]
    assert by_subject["chinese"][2].choices == ["好", "坏", "长", "短"] and by_subject["chinese"][2].answer == 0
    assert by_subject["english"][1].question == "The king is dead; long live the"
    assert by_subject["shakespeare"][0].choices[0] == "breaks?"
    assert by_subject["arc"][0].choices == ["36", "7", "12"] and by_subject["arc"][1].answer == 1
    assert by_subject["arc"][1].where.endswith("arc.jsonl:2")


def test_bad_files_name_the_line(tmp_path):
    bad = tmp_path / "x_val.csv"
    bad.write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n")
    with pytest.raises(MiniMindError, match=r"x_val.csv:3: answer 'E' is not one of A, B, C, D"):
        read_mc(bad)
    bad = tmp_path / "y.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": "A"}\n{"question": "q"}\n')
    with pytest.raises(MiniMindError, match=r"y.jsonl:2: expected a question and 2 to 10 text choices"):
        read_mc(bad)
    with pytest.raises(MiniMindError, match="no such file"):
        read_mc(tmp_path / "missing.csv")


def test_reads_the_hubs_layouts(tmp_path):
    """MMLU as the hub exports it (CSV with choice0.. or A..D columns and 0-3 answers, a `choices` list in a CSV
    cell as pandas writes it, Parquet and JSONL with subject/choices/answer), C-Eval's Parquet (ceval/ceval-exam)
    and CMMLU's JSONL (haonan-li/cmmlu): the same questions each time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    questions = [("3 + 4 =", ["7", "8", "12", "36"], 0), ("The king is dead; long live the", ["dog", "king"], 1)]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "math_test.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\n\"3 + 4 =\",7,8,12,36,0\n", encoding="utf-8")
    (tmp_path / "a" / "letters.csv").write_text("question,A,B,answer\nThe king is dead; long live the,dog,king,1\n")
    # pandas writes a list column as numpy's repr: quoted texts without commas, here quotes and a newline inside.
    with (tmp_path / "b.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["subject", "question", "choices", "answer"],
                                  ["math", "3 + 4 =", "['7' '8' '12' '36']", 0],
                                  ["lit", "The king is dead; long live the", "['dog' 'king']", 1],
                                  ["lit", "q", """['it"s' "it's" 'a\\nb']""", 2]])
    hub = tmp_path / "mmlu" / "all"
    hub.mkdir(parents=True)
    table = pa.Table.from_pylist([{"question": q, "subject": s, "choices": c, "answer": a}
                                  for (q, c, a), s in zip(questions, ["math", "lit"])])
    pq.write_table(table, hub / "test-00000-of-00001.parquet")
    (tmp_path / "mmlu.jsonl").write_text("".join(json.dumps({"question": q, "subject": "x", "choices": c, "answer": a})
                                                 + "\n" for q, c, a in questions))
    for (q, c, a), got in zip(questions, [read_mc(tmp_path / "a" / "math_test.csv")[0],
                                          read_mc(tmp_path / "a" / "letters.csv")[0]]):
        assert (got.question, got.choices, got.answer) == (q, c, a)
    listed = read_mc(tmp_path / "b.csv")
    assert [(i.question, i.choices, i.answer, i.subject) for i in listed[:2]] == \
        [(q, c, a, s) for (q, c, a), s in zip(questions, ["math", "lit"])]
    assert listed[2].choices == ['it"s', "it's", "a\nb"]
    for path in (hub, tmp_path / "mmlu.jsonl"):
        assert [(i.question, i.choices, i.answer) for i in read_mc(path)] == questions
    assert [i.subject for i in read_mc(hub)] == ["math", "lit"]  # the rows name their subject
    pq.write_table(table.slice(0, 1), hub / "dev-00000-of-00001.parquet")
    assert len(read_mc(hub)) == 3 and len(read_mc(tmp_path / "mmlu" / "*" / "test-*.parquet")) == 2  # one split

    ceval = tmp_path / "ceval" / "accountant"
    ceval.mkdir(parents=True)
    row = {"id": 0, "question": "这本书写得非常", "A": "好", "B": "坏", "C": "长", "D": "短", "answer": "C",
           "explanation": ""}
    pq.write_table(pa.Table.from_pylist([row]), ceval / "val-00000-of-00001.parquet")
    got = read_mc(tmp_path / "ceval")[0]
    assert (got.choices, got.answer, got.subject) == (["好", "坏", "长", "短"], 2, "accountant")  # subject: folder
    assert got.where.endswith("val-00000-of-00001.parquet: row 1")
    cmmlu = tmp_path / "agronomy.jsonl"
    cmmlu.write_text(json.dumps({"Question": "今天天气", "A": "很好", "B": "不好", "Answer": "B"}, ensure_ascii=False))
    got = read_mc(cmmlu)[0]
    assert (got.question, got.choices, got.answer, got.subject) == ("今天天气", ["很好", "不好"], 1, "agronomy")


def test_files_without_answers_say_so(tmp_path):
    """C-Eval's test split: no answer column in its CSV, empty answers in the hub's Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_test = tmp_path / "accountant_test.csv"
    csv_test.write_text("id,question,A,B,C,D\n0,这本书写得非常,好,坏,长,短\n", encoding="utf-8")
    with pytest.raises(MiniMindError, match=r"accountant_test.csv:1: no 'answer' column: this file has no answers"):
        read_mc(csv_test)
    row = {"id": 0, "question": "这本书写得非常", "A": "好", "B": "坏", "C": "长", "D": "短", "answer": "",
           "explanation": ""}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "test-00000-of-00001.parquet")
    with pytest.raises(MiniMindError, match=r"parquet: row 1: no answer: this file has no answers"):
        read_mc(tmp_path / "test-00000-of-00001.parquet")


def test_csv_errors_name_the_physical_line(tmp_path):
    """A quoted field spanning lines: the bad record starts on line 5 of the file, though it is record 3."""
    bad = tmp_path / "x_val.csv"
    bad.write_text('id,question,A,B,C,D,answer\n0,"a question\non three\nlines",a,b,c,d,A\n1,q,a,b,c,d,E\n')
    with pytest.raises(MiniMindError, match=r"x_val.csv:5: answer 'E' is not one of A, B, C, D"):
        read_mc(bad)
    bad.write_text('"multi\nline question",a,b,c,A\n"q",a,b,c\n')  # MMLU's header-less layout
    with pytest.raises(MiniMindError, match=r"x_val.csv:3: expected 5 columns, found 4"):
        read_mc(bad)


def hand_loglik(model, tokenizer, context: str, continuation: str, bos: bool = True) -> float:
    """One unpadded forward pass of <|im_start|> + context + continuation; sum the continuation's log-probs."""
    ctx = [1] * bos + tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(continuation, add_special_tokens=False)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits[0].log_softmax(-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def count_rows(model):
    """Sequences the model reads, counted by a forward hook: [count]."""
    seen = [0]
    model.register_forward_hook(lambda m, args, out: seen.__setitem__(0, seen[0] + args[0].shape[0]))
    return seen


def expected_counts(lls, options, answer):
    """Whether the argmax of the log-likelihoods, of them per character and per UTF-8 byte is the answer."""
    keys = [lls, [ll / len(o) for ll, o in zip(lls, options)], [ll / len(o.encode()) for ll, o in zip(lls, options)]]
    return [max(range(len(k)), key=k.__getitem__) == answer for k in keys]


@pytest.mark.parametrize("mode, bos", [("loglik", True), ("letter", True), ("letter", False)])
def test_scores_match_hand_computed_logliks(mc_dir, tokenizer, mode, bos):
    model = small_model("qwen3", vocab_size=len(tokenizer))
    items = read_mc(mc_dir)
    shots = shots_for(items, 1)
    # Batched, right-padded, sorted by length, letters sharing one pass: still equal to one plain forward pass
    # per option.
    requests = [r for it, s in zip(items, shots) for r in requests_for(it, s, mode)]
    rows = count_rows(model)
    got = loglikelihoods(model, tokenizer, requests, batch_size=5, bos=bos)
    # One pass per distinct model input: letter, one per question (one context, one-token continuations " A",
    # " B", ...); loglik, one per option except where two options of a question are single tokens.
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    inputs = {tuple(([1] * bos + enc(c) + enc(x))[:-1]) for c, x in requests}
    assert rows[0] == len(inputs)
    assert len(inputs) == len(items) if mode == "letter" else len(items) < len(inputs) <= len(requests)
    hand = {r: hand_loglik(model, tokenizer, *r, bos=bos) for r in requests}
    for (context, continuation), (ll, n) in zip(requests, got):
        assert math.isclose(ll, hand[context, continuation], rel_tol=1e-5, abs_tol=1e-5)
        assert n == len(tokenizer.encode(continuation, add_special_tokens=False))
    # acc, acc_norm, acc_bytes: argmax of the hand-computed sums, of them per character, per UTF-8 byte.
    result = evaluate_mc(model, tokenizer, items, few_shot=1, mode=mode, batch_size=7, bos=bos)
    counts = [0, 0, 0]
    for it, s in zip(items, shots):
        reqs = requests_for(it, s, mode)
        for m, ok in enumerate(expected_counts([hand[r] for r in reqs], [x[1:] for _, x in reqs], it.answer)):
            counts[m] += ok
    assert result.total == len(items) == 9
    assert [result.correct, result.correct_norm, result.correct_bytes] == counts
    assert sum(v["n"] for v in result.subject_accuracy().values()) == 9
    if mode == "letter":
        assert requests_for(items[0], [], mode)[1][1] == " B"
        assert "\nB. " in requests_for(items[0], [], mode)[0][0]
        assert result.correct_norm == result.correct_bytes == result.correct  # all options one character


# Options mixing Chinese (3 bytes a character) and ASCII, so that per character and per byte rank them apart.
ZH_OPTIONS = [["新华社北京电", "king", "今天天气很好", "be"], ["go", "国务院今天举行新闻发布会", "light", "好"],
              ["我们一起去公园", "dog", "see", "这本书写得非常好"], ["run", "queen", "推荐给大家", "散步吧"]]


def test_acc_norm_is_per_character_and_acc_bytes_per_byte(tmp_path, tokenizer):
    rows = [f"{i},今天天气很好，这是第{i}题,{','.join(opts)},{'ABCD'[i % 4]}," for i, opts in
            enumerate(ZH_OPTIONS * 3)]
    path = tmp_path / "chinese_val.csv"
    path.write_text("id,question,A,B,C,D,answer,explanation\n" + "\n".join(rows) + "\n", encoding="utf-8")
    items = read_mc(path)
    model = small_model("qwen3", vocab_size=len(tokenizer))
    result = evaluate_mc(model, tokenizer, items)
    counts = [0, 0, 0]
    for it in items:
        reqs = requests_for(it, [], "loglik")
        lls = [hand_loglik(model, tokenizer, *r) for r in reqs]
        for m, ok in enumerate(expected_counts(lls, it.choices, it.answer)):
            counts[m] += ok
    assert [result.correct, result.correct_norm, result.correct_bytes] == counts
    assert result.acc_norm != result.acc_bytes  # this fixture tells them apart
    subject = result.subject_accuracy()["chinese"]
    assert subject["acc_norm"] == result.acc_norm and subject["acc_bytes"] == result.acc_bytes


def test_few_shot_prompt_and_limit(mc_dir, tokenizer):
    items = read_mc(mc_dir)
    shots = shots_for(items, 5)
    for it, s in zip(items, shots):
        assert it not in s and all(x.subject == it.subject for x in s)
    chinese = [i for i, it in enumerate(items) if it.subject == "chinese"]
    assert len(shots[chinese[0]]) == 2  # at most the other items of the subject
    context, continuation = requests_for(items[chinese[0]], shots[chinese[0]][:1], "loglik")[0]
    assert context.count("答案：") == 2 and context.endswith("今天天气很好，我们一起去公园\n答案：")
    assert context.startswith("新华社北京电，国务院今天举行\n答案： 新闻发布会\n\n")  # a shot, with its answer
    assert continuation == " 散步吧"
    model = small_model("qwen3", vocab_size=len(tokenizer))
    limited = evaluate_mc(model, tokenizer, items, limit=4)
    assert limited.total == 4 and len(limited.subject_accuracy()) == 4  # round-robin: one per subject


def test_shot_counts_are_recorded(mc_dir, tokenizer, tmp_path, run_model, capsys):
    """A subject without a --shots file gets none, one with fewer dev items gets fewer: the result, the table and
    the JSON say how many, a warning names them; no shots for any subject is an error."""
    run, model = run_model
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "chinese_dev.csv").write_text(CEVAL, encoding="utf-8")  # 3 examples
    (dev / "english_dev.csv").write_text(CMMLU, encoding="utf-8")  # 2 examples; no shakespeare, no arc
    items = read_mc(mc_dir)
    result = evaluate_mc(model, tokenizer, items, few_shot=3, shot_pool=read_mc(dev))
    assert result.shots == {"chinese": 3, "english": 2, "shakespeare": 0, "arc": 0}
    assert result.short_of_shots() == {"arc": 0, "english": 2, "shakespeare": 0}
    assert evaluate_mc(model, tokenizer, items, few_shot=5).shots == {"chinese": 2, "english": 1, "shakespeare": 1,
                                                                      "arc": 1}  # the other items of each subject
    eval_cli(["--model", str(run / "model"), "--task", "mc", "--data", str(mc_dir), "--few-shot", "3", "--shots",
              str(dev), "--out", str(tmp_path / "mc.json")])
    out = capsys.readouterr()
    assert "warning: english: 2 of the 3 few-shot examples asked for" in out.err
    assert "warning: arc: 0 of the 3" in out.err and "warning: chinese" not in out.err
    lines = {line.split()[0]: line.split() for line in out.out.splitlines() if line.strip()}
    assert lines["subject"][:3] == ["subject", "n", "shots"]
    assert [lines[s][2] for s in ("chinese", "english", "shakespeare", "arc", "overall")] == ["3", "2", "0", "0", "0"]
    record = json.loads((tmp_path / "mc.json").read_text())
    assert {s: v["shots"] for s, v in record["subjects"].items()} == result.shots
    assert record["metrics"]["few_shot"] == 3 and record["metrics"]["subjects_short_of_shots"] == 3
    assert record["metrics"]["accuracy"] == result.accuracy and record["metrics"]["acc_bytes"] == result.acc_bytes
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "physics_dev.csv").write_text(CMMLU, encoding="utf-8")
    with pytest.raises(MiniMindError, match="3-shot asked, but the --shots pool gave no subject any example"):
        evaluate_mc(model, tokenizer, items, few_shot=3, shot_pool=read_mc(tmp_path / "other"))


def gsm8k_file(tmp_path, answers):
    path = tmp_path / "gsm8k.jsonl"
    questions = ["3 + 4 =", "The king is dead", "12 * 3 =", "今天天气很好"]
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(questions, answers)))
    return path


def test_gsm8k_reading_and_exact_match(tmp_path, tokenizer):
    rows = read_qa(gsm8k_file(tmp_path, ["Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072", 5, "x", "y"]))
    assert rows[0]["answer"] == "1072" and rows[0]["solution"] == "Natalia sold 48/2 = 24 clips."
    assert rows[1]["answer"] == "5"
    model = small_model("qwen3", vocab_size=len(tokenizer))
    model.config.eos_token_id = len(tokenizer) + 1  # never stops early: every reply is 12 tokens
    params = SamplingParams(max_new_tokens=12, temperature=0)
    for think in (False, True):
        prompts = [encode_chat(tokenizer, [{"role": "user", "content": r["question"]}], add_generation_prompt=True,
                               enable_thinking=think)[0] for r in rows]
        reference = [c.text for c in generate(model, tokenizer, prompts, params)]
        # Gold answers that the reference replies contain (rows 0, 1) and ones they cannot (rows 2, 3).
        golds = []
        for text in reference[:2]:
            got = extract_answer(("<think>\n" if think else "") + text)
            golds.append(got if got else "never-in-a-reply")
        golds += ["987654321", "-55555"]
        expected = sum(g != "never-in-a-reply" for g in golds[:2])
        rows = read_qa(gsm8k_file(tmp_path, golds))
        result = evaluate_exact(model, tokenizer, rows, enable_thinking=think, max_new_tokens=12, batch_size=3)
        assert [s["output"] for s in result.samples] == reference
        assert result.total == 4 and result.correct == expected
        assert math.isclose(result.accuracy, expected / 4)


def test_gsm8k_few_shot_turns(tmp_path, tokenizer):
    """Few-shot rows become earlier chat turns, with the worked solution and 'The answer is N.'"""
    from minimind.eval.exact_match import _shot_messages

    shot = read_qa(gsm8k_file(tmp_path, ["2 + 2 = 4\n#### 4", "1", "2", "3"]))[0]
    assert _shot_messages(shot, think=False)[1]["content"] == "2 + 2 = 4\nThe answer is 4."
    assert _shot_messages(shot, think=True)[1] == {"role": "assistant", "content": "The answer is 4.",
                                                   "reasoning_content": "2 + 2 = 4"}
    assert extract_answer("2 + 2 = 4\nThe answer is 4.") == "4"


@pytest.fixture
def run_model(tmp_path, tokenizer):
    run = tmp_path / "runs" / "demo"
    (run / "config.toml").parent.mkdir(parents=True)
    (run / "config.toml").write_text("stage = 'sft'\n")
    # A long context: calculator probes carry the tool schema, many tokens with this 400-token vocabulary.
    model = small_model("qwen3", vocab_size=len(tokenizer), max_position_embeddings=2048)
    save_model(model, run / "model", tokenizer)
    return run, model


def eval_cli(argv):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--dtype", "float32", "--device", "cpu", "--no-progress", *argv])
    args.func(args)


def test_cli_ppl_json_and_report(run_model, tokenizer, tmp_path, capsys):
    run, model = run_model
    texts = ["The king is dead; long live the king.", "今天天气很好，我们一起去公园散步吧。", "To be, or not to be."]
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    eval_cli(["--model", str(run / "model"), "--task", "ppl", "--data", str(data), "--limit", "2", "--stride", "8"])
    out = capsys.readouterr().out
    assert "bits_per_byte" in out and "perplexity" in out
    record = json.loads((run / "eval_ppl.json").read_text())
    nats = sum(-hand_loglik(model, tokenizer, "", t) for t in texts[:2])  # every token after <|im_start|>
    n_bytes = sum(len(t.encode()) for t in texts[:2])
    assert math.isclose(record["metrics"]["bits_per_byte"], nats / math.log(2) / n_bytes, rel_tol=1e-4)
    assert record["metrics"]["texts"] == 2 and (record["metrics"]["seq_len"], record["metrics"]["stride"]) == (512, 8)
    assert math.isclose(record["metrics"]["bits_per_byte"],
                        score_texts(model, tokenizer, texts[:2]).bits_per_byte, rel_tol=1e-6)
    report = (run / "report.md").read_text().splitlines()
    assert len(report) == 1 and report[0].startswith("- eval ppl on val.jsonl") and "bits/byte" in report[0]


def test_cli_mc_and_probes(run_model, tokenizer, mc_dir, tmp_path, capsys):
    run, model = run_model
    eval_cli(["--model", str(run / "model"), "--task", "mc", "--data", str(mc_dir), "--few-shot", "1",
              "--out", str(tmp_path / "mc.json")])
    table = capsys.readouterr().out
    assert "chinese" in table and "overall" in table
    record = json.loads((tmp_path / "mc.json").read_text())
    direct = evaluate_mc(model, tokenizer, read_mc(mc_dir), few_shot=1)
    assert record["metrics"]["accuracy"] == direct.accuracy and record["metrics"]["items"] == 9
    assert set(record["subjects"]) == {"arc", "chinese", "english", "shakespeare"}
    assert record["metrics"]["bos"] is True and "acc_norm" in table and "acc_bytes" in table
    eval_cli(["--model", str(run / "model"), "--task", "mc", "--data", str(mc_dir), "--no-bos", "--mode", "letter",
              "--out", str(tmp_path / "mc.json")])
    record = json.loads((tmp_path / "mc.json").read_text())
    direct = evaluate_mc(model, tokenizer, read_mc(mc_dir), mode="letter", bos=False)
    assert record["metrics"]["bos"] is False and record["metrics"]["accuracy"] == direct.accuracy
    assert [s["loglik"] for s in record["samples"]] == [s["loglik"] for s in direct.samples]

    eval_cli(["--model", str(run / "model"), "--task", "probes", "--limit", "6", "--max-new-tokens", "8"])
    record = json.loads((run / "eval_probes.json").read_text())
    rows = make_tasks(6, seed=0, split="heldout")
    direct = probe_accuracy(model, tokenizer, rows, max_new_tokens=8)
    assert record["metrics"] == {"tasks": 6, "correct": direct.correct, "accuracy": direct.accuracy}
    assert [s["output"] for s in record["samples"]] == [s["output"] for s in direct.samples]
    report = (run / "report.md").read_text().splitlines()
    assert len(report) == 3 and "letter, 0-shot, no BOS)" in report[1]
    with pytest.raises(MiniMindError, match=r"--stride must be 1 to the window length \(512\), got 600"):
        (tmp_path / "t.jsonl").write_text('{"text": "To be"}\n')
        eval_cli(["--model", str(run / "model"), "--task", "ppl", "--data", str(tmp_path / "t.jsonl"), "--stride",
                  "600"])
    with pytest.raises(MiniMindError, match="--task gsm8k needs --data"):
        eval_cli(["--model", str(run / "model"), "--task", "gsm8k"])
