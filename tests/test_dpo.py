"""DPO: the loss against hand-computed values, pair reading and masking, and a short run from the SFT fixture
that raises held-out preference accuracy. `pytest tests/test_dpo.py`."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import minimind_loss_mask, small_model

from minimind import MiniMindError
from minimind.chat import encode_chat
from minimind.checkpoint import load_model
from minimind.data.formats import parse_row
from minimind.data.preferences import collate_pairs, make_repetition_pairs, read_pairs
from minimind.data.tasks import heldout_split, make_dpo_pairs
from minimind.eval.preference import mistake_pairs, pair_margins, preference_accuracy
from minimind.generation import Completion
from minimind.tokenizer import load_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.dpo import DPOStage, dpo_loss
from minimind.train.loop import train

Q = [{"role": "user", "content": "What is 3 + 4?"}]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_equals_hand_computed_values():
    pc, pr = torch.tensor([-10.0, -7.0]), torch.tensor([-12.0, -6.0])
    rc, rr = torch.tensor([-11.0, -6.5]), torch.tensor([-11.5, -6.5])
    losses, extras = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 0: h = (-10 + 11) - (-12 + 11.5) = 1.5; pair 1: h = (-7 + 6.5) - (-6 + 6.5) = -1.0
    assert losses.tolist() == pytest.approx([-log_sigmoid(0.15), -log_sigmoid(-0.1)], abs=1e-6)
    assert float(extras["chosen_reward"]) == pytest.approx((0.1 * 1 + 0.1 * -0.5) / 2)
    assert float(extras["rejected_reward"]) == pytest.approx((0.1 * -0.5 + 0.1 * 0.5) / 2)
    assert float(extras["margin"]) == pytest.approx((0.15 - 0.1) / 2)
    assert float(extras["accuracy"]) == 0.5
    smooth, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)  # conservative DPO
    assert float(smooth[0]) == pytest.approx(-0.8 * log_sigmoid(0.15) - 0.2 * log_sigmoid(-0.15), abs=1e-6)


def test_stage_loss_on_a_fixed_batch_matches_a_manual_computation(tokenizer):
    """The whole stage path (encode, collate, forward, gather, reference) against per-token arithmetic."""
    cfg = TrainConfig(stage="dpo", dpo_beta=0.2, dpo_label_smoothing=0.1, seq_len=64)
    policy, ref = small_model("qwen3", seed=0, vocab_size=len(tokenizer)), small_model("qwen3", seed=1,
                                                                                      vocab_size=len(tokenizer))
    stage = DPOStage(cfg, tokenizer)
    stage.setup(ref, torch.device("cpu"))  # the frozen copy of `ref` serves as the reference
    rows = []
    for good, bad in (("7", "8"), ("The answer is 7.", "It is 12, I think.")):
        sides = [encode_chat(tokenizer, Q + [{"role": "assistant", "content": t}]) for t in (good, bad)]
        rows.append(tuple(np.array(x) for s in sides for x in s))
    batch = stage.collate(rows)
    total, n, extras = stage.loss(policy, batch)

    def logp(model, ids, mask):
        with torch.no_grad():
            logits = model(torch.tensor(ids[None].astype("int64"))).logits[0].double()
        return sum(float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(1, len(ids)) if mask[t])

    expect = 0.0
    for c_ids, c_mask, r_ids, r_mask in rows:
        h = 0.2 * ((logp(policy, c_ids, c_mask) - logp(ref, c_ids, c_mask))
                   - (logp(policy, r_ids, r_mask) - logp(ref, r_ids, r_mask)))
        expect += -0.9 * log_sigmoid(h) - 0.1 * log_sigmoid(-h)
    assert n == 2 and stage.count(batch) == 2
    assert float(total.detach()) == pytest.approx(expect, rel=1e-4)
    assert set(extras) == {"chosen_reward", "rejected_reward", "margin", "accuracy"}
    with torch.no_grad():  # the reference is frozen and a separate copy
        assert all(not p.requires_grad for p in stage.ref.parameters())
        assert stage.ref.model.embed_tokens.weight.data_ptr() != ref.model.embed_tokens.weight.data_ptr()

    # With dpo_nll_weight, each pair adds that much of the chosen reply's mean per-token NLL.
    stage.cfg.dpo_nll_weight = 0.5
    total, _, extras = stage.loss(policy, batch)
    nll = [-logp(policy, c_ids, c_mask) / c_mask[1:].sum() for c_ids, c_mask, _, _ in rows]
    assert float(total.detach()) == pytest.approx(expect + 0.5 * sum(nll), rel=1e-4)
    assert float(extras["chosen_nll"]) == pytest.approx(sum(nll) / 2, rel=1e-4)


def test_read_pairs_both_layouts_response_mask_truncation_and_bad_lines(tokenizer, tmp_path):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."},
               {"role": "user", "content": "What is 3 + 4?"}]
    rows = [
        {"chosen": Q + [{"role": "assistant", "content": "7"}],
         "rejected": Q + [{"role": "assistant", "content": "8"}]},
        {"prompt": history, "chosen": "It is 7.", "rejected": "It is 9."},
        {"prompt": "Say something long.", "chosen": "ok " * 200, "rejected": "no"},  # truncated to seq_len
    ]
    f = tmp_path / "dpo.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = read_pairs(str(f), tokenizer, seq_len=96)
    assert len(data) == 3 and data.stats.truncated == 1 and data.stats.skipped_bad == 0
    c_ids, c_mask, r_ids, r_mask = data[1]
    # Only the reply after the last user turn carries loss, not the earlier assistant turn of the history.
    reply = tokenizer.decode([int(t) for t, m in zip(c_ids, c_mask) if m])
    assert reply.strip().startswith("<think>") and "It is 7." in reply and "Hello" not in reply
    assert len(data[2][0]) == 96 and data.stats.longest > 96
    batch = collate_pairs([data[0], data[2]])
    assert batch["input_ids"].shape == (4, 96)
    assert int((batch["labels"][2] != -100).sum()) == int(data[0][3].sum())  # row 2 is pair 0's rejected side

    f.write_text(f.read_text() + '{"chosen": "x", "rejected": "y"}\n')
    with pytest.raises(MiniMindError, match=r"dpo.jsonl:4: 'chosen' is a string but the row has no 'prompt'"):
        read_pairs(str(f), tokenizer, seq_len=96)
    assert read_pairs(str(f), tokenizer, seq_len=96, skip_bad=True).stats.skipped_bad == 1
    with pytest.raises(MiniMindError, match="dpo_beta must be > 0"):
        DPOStage(TrainConfig(dpo_beta=0), tokenizer)


def test_train_newline_after_eos_gives_minimind_dpo_masks(tokenizer, tmp_path):
    """With the setting, both sides' masks are MiniMind's DPO masks (its rule on the same ids) for its row layout
    (a prompt, then the reply: here one plain and one with a tool round trip); by default one "\\n" token per
    reply turn less."""
    tool = {"type": "function", "function": {"name": "add", "parameters": {}}}
    call = {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 3, "b": 4}}]}
    rows = [{"chosen": Q + [{"role": "assistant", "content": "7"}],
             "rejected": Q + [{"role": "assistant", "content": "8", "reasoning_content": "3 + 4 is 8"}]},
            {"tools": [tool],
             "chosen": Q + [call, {"role": "tool", "content": "7"}, {"role": "assistant", "content": "7"}],
             "rejected": Q + [{"role": "assistant", "content": "It is 8."}]}]
    f = tmp_path / "dpo.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    on = DPOStage(TrainConfig(stage="dpo", train_newline_after_eos=True), tokenizer).dataset(str(f))
    off = DPOStage(TrainConfig(stage="dpo"), tokenizer).dataset(str(f))
    for k, row in enumerate(rows):
        for side, (ids, mask) in (("chosen", on[k][:2]), ("rejected", on[k][2:])):
            assert mask.tolist() == minimind_loss_mask(ids.tolist(), tokenizer)
            plain = off[k][1] if side == "chosen" else off[k][3]
            assert int(mask.sum() - plain.sum()) == sum(m["role"] == "assistant" for m in row[side])


def test_repetition_pairs_are_valid_and_prefer_the_concise_reply():
    tasks = heldout_split(0, 10, seed=3)[1]
    pairs = make_repetition_pairs(tasks, seed=3)
    assert len(pairs) == 10
    for pair, task in zip(pairs, tasks):
        row = parse_row(pair, "dpo")  # same prompt on both sides, both end with the assistant
        chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        assert chosen == task["conversations"][-1]["content"]
        assert rejected.count(chosen) >= 2 and len(rejected) >= 2 * len(chosen)


def preference_pairs(tasks: list[dict], seed: int) -> list[dict]:
    """Built-in kinds a few steps can teach: "I don't know" rejected for identity questions, a repetitive
    reply rejected for the others (the wrong-number kind needs a model that can already copy its working)."""
    identity = [t for t in tasks if t["task"] == "identity"]
    return make_dpo_pairs(identity, seed) + make_repetition_pairs([t for t in tasks if t["task"] != "identity"], seed)


def test_a_short_dpo_run_raises_the_heldout_margin(sft_model_dir, tmp_path):
    train_tasks, heldout_tasks = heldout_split(48, 24, seed=7, families=("identity", "arithmetic", "units"))
    train_file = tmp_path / "dpo.jsonl"
    train_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in preference_pairs(train_tasks, 7)))
    heldout = preference_pairs(heldout_tasks, 8)
    tokenizer = load_tokenizer(sft_model_dir)
    start = load_model(sft_model_dir)
    before = preference_accuracy(start, tokenizer, heldout)  # per token: the repetitive side is longer

    cfg = TrainConfig(stage="dpo", out=str(tmp_path / "dpo"), data=str(train_file), init_from=str(sft_model_dir),
                      seq_len=192, batch_size=8, steps=8, lr=1e-3, warmup_steps=1, dpo_beta=0.1, log_every=1,
                      workers=1, progress=False, threads=2, dtype="float32")
    policy = load_model(train(cfg, DPOStage))
    after = preference_accuracy(policy, tokenizer, heldout)
    summed = [pair_margins(m, tokenizer, heldout) for m in (start, policy)]
    implicit = pair_margins(policy, tokenizer, heldout, ref_model=start)
    print(f"held-out preference accuracy (per token) {before[0]:.2f} -> {after[0]:.2f}; summed margin "
          f"{sum(summed[0]) / 24:.2f} -> {sum(summed[1]) / 24:.2f}; implicit reward accuracy "
          f"{sum(m > 0 for m in implicit) / len(implicit):.2f}")
    assert after[0] > before[0] and after[1] > before[1]
    assert sum(summed[1]) > sum(summed[0]) + 5.0 * len(heldout)  # nats per pair: chosen gains on rejected
    # Relative to the starting model (the reference), the implicit reward favours chosen on most held-out pairs.
    assert sum(m > 0 for m in implicit) / len(implicit) >= 0.8

    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert {"chosen_reward", "rejected_reward", "margin", "accuracy"} <= set(steps[-1])
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at the first step
    assert min(r["loss"] for r in steps[-3:]) < 0.5 and steps[-1]["margin"] > 0


def test_mistake_pairs_pit_the_reference_against_the_models_own_wrong_reply(monkeypatch):
    tasks = heldout_split(0, 16, seed=5, families=("arithmetic", "units", "identity", "calculator"))[1]
    pairs = make_dpo_pairs(tasks, seed=5)
    pairs += make_repetition_pairs(tasks, seed=5)  # the same prompts again: each is answered once
    numeric = [t for t in tasks if t["task"] in ("arithmetic", "units")]
    asked = []

    def answers(model, tokenizer, rows, batch_size=32):
        # Stands in for greedy generation (answer_tasks is probe_accuracy's, tested in test_eval_harness): the
        # first reply is right, the second never closes its thinking, every other one gets a wrong number.
        for i, row in enumerate(rows):
            asked.append(row["conversations"][:-1])
            text = (f"ok\n</think>\n\nThe answer is {row['answer']}." if i == 0 else "1 + 1 = 2" if i == 1
                    else f"{i} * 2 = {2 * i}\n</think>\n\nThe answer is {int(row['answer']) + 1}.")
            yield row, True, Completion(text=text, finish_reason="stop")

    monkeypatch.setattr("minimind.eval.preference.answer_tasks", answers)
    own = mistake_pairs(None, None, pairs)
    # Each numeric, tool-free prompt is asked once; identity (no number) and calculator (a tool task) are not.
    assert sorted(map(json.dumps, asked)) == sorted(json.dumps(t["conversations"][:-1]) for t in numeric)
    assert len(own) == len(numeric) - 2
    for i, (pair, task) in enumerate(zip(own, numeric[2:]), start=2):
        parse_row(pair, "dpo")
        assert pair["kind"] == "own mistake" and pair["task"] == task["task"]
        assert pair["chosen"] == task["conversations"]
        assert pair["rejected"] == [*task["conversations"][:-1], {
            "role": "assistant", "content": f"The answer is {int(task['answer']) + 1}.",
            "reasoning_content": f"{i} * 2 = {2 * i}"}]


def test_data_mistakes_command_reads_both_layouts_and_names_a_bad_line(sft_model_dir, tmp_path, monkeypatch, capsys):
    from minimind import cli

    def wrong(model, tokenizer, rows, batch_size=32):
        for row in rows:
            yield row, False, Completion(text="The answer is 0.", finish_reason="stop")

    monkeypatch.setattr("minimind.eval.preference.answer_tasks", wrong)
    rows = [{"prompt": "What is 3 + 4?", "chosen": "The answer is 7.", "rejected": "The answer is 8.",
             "task": "arithmetic"},
            {"chosen": [*Q, {"role": "assistant", "content": "The answer is 7."}],
             "rejected": [*Q, {"role": "assistant", "content": "7 7 7"}]},
            {"chosen": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "MiniMind."}],
             "rejected": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "No."}]}]
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "own.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["data", "mistakes", "--model", str(sft_model_dir), "--pairs", str(pairs), "--out", str(out)]) == 0
    own = [json.loads(line) for line in out.read_text().splitlines()]
    # One per numeric prompt (the two layouts ask the same question, so once); the identity pair has no number.
    assert len(own) == 1 and own[0]["task"] == "arithmetic" and own[0]["kind"] == "own mistake"
    assert own[0]["rejected"][-1] == {"role": "assistant", "content": "The answer is 0."}
    assert "wrote 1 pairs" in capsys.readouterr().out

    pairs.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"chosen": "x"}) + "\n")
    assert cli.main(["data", "mistakes", "--model", str(sft_model_dir), "--pairs", str(pairs), "--out", str(out)]) == 2
    assert f"{pairs}:2:" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 1  # the last good output is untouched
