"""The evaluation harness: multiple choice in each file layout against hand-computed log-likelihoods, GSM8K-style
exact match against a plain generate() reference, and `minimind eval` end to end. Run: .venv/bin/pytest
tests/test_eval_harness.py"""

import argparse
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
    with pytest.raises(MiniMindError, match=r"y.jsonl:2: expected a question and a list of 2 to 10"):
        read_mc(bad)
    with pytest.raises(MiniMindError, match="no such file"):
        read_mc(tmp_path / "missing.csv")


def hand_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """One unpadded forward pass of <|im_start|> + context + continuation; sum the continuation's log-probs."""
    ctx = [1] + tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(continuation, add_special_tokens=False)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits[0].log_softmax(-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


@pytest.mark.parametrize("mode", ["loglik", "letter"])
def test_scores_match_hand_computed_logliks(mc_dir, tokenizer, mode):
    model = small_model("qwen3", vocab_size=len(tokenizer))
    items = read_mc(mc_dir)
    shots = shots_for(items, 1)
    # Batched, right-padded, sorted by length: still equal to one plain forward pass per option.
    requests = [r for it, s in zip(items, shots) for r in requests_for(it, s, mode)]
    got = loglikelihoods(model, tokenizer, requests, batch_size=5)
    hand = {r: hand_loglik(model, tokenizer, *r) for r in requests}
    for (context, continuation), (ll, n) in zip(requests, got):
        assert math.isclose(ll, hand[context, continuation], rel_tol=1e-5, abs_tol=1e-4)
        assert n == len(tokenizer.encode(continuation, add_special_tokens=False))
    # Accuracy: argmax of the hand-computed sums (and, for loglik, of sums per UTF-8 byte).
    result = evaluate_mc(model, tokenizer, items, few_shot=1, mode=mode, batch_size=7)
    correct = correct_norm = 0
    for it, s in zip(items, shots):
        lls = [hand[r] for r in requests_for(it, s, mode)]
        norms = [ll / len(x.strip().encode()) for ll, (_, x) in zip(lls, requests_for(it, s, mode))]
        correct += max(range(len(lls)), key=lls.__getitem__) == it.answer
        correct_norm += max(range(len(norms)), key=norms.__getitem__) == it.answer
    assert result.total == len(items) == 9
    assert result.correct == correct
    assert result.correct_norm == (correct_norm if mode == "loglik" else correct)
    assert sum(v["n"] for v in result.subject_accuracy().values()) == 9
    if mode == "letter":
        assert requests_for(items[0], [], mode)[1][1] == " B"
        assert "\nB. " in requests_for(items[0], [], mode)[0][0]


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
    eval_cli(["--model", str(run / "model"), "--task", "ppl", "--data", str(data), "--limit", "2"])
    out = capsys.readouterr().out
    assert "bits_per_byte" in out and "perplexity" in out
    record = json.loads((run / "eval_ppl.json").read_text())
    nats = sum(-hand_loglik(model, tokenizer, "", t) for t in texts[:2])  # every token after <|im_start|>
    n_bytes = sum(len(t.encode()) for t in texts[:2])
    assert math.isclose(record["metrics"]["bits_per_byte"], nats / math.log(2) / n_bytes, rel_tol=1e-4)
    assert record["metrics"]["texts"] == 2
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

    eval_cli(["--model", str(run / "model"), "--task", "probes", "--limit", "6", "--max-new-tokens", "8"])
    record = json.loads((run / "eval_probes.json").read_text())
    rows = make_tasks(6, seed=0, split="heldout")
    direct = probe_accuracy(model, tokenizer, rows, max_new_tokens=8)
    assert record["metrics"] == {"tasks": 6, "correct": direct.correct, "accuracy": direct.accuracy}
    assert [s["output"] for s in record["samples"]] == [s["output"] for s in direct.samples]
    assert len((run / "report.md").read_text().splitlines()) == 2
    with pytest.raises(MiniMindError, match="--task gsm8k needs --data"):
        eval_cli(["--model", str(run / "model"), "--task", "gsm8k"])
