"""Distillation: the KD loss against hand-computed values, the tokenizer check, a student that gets closer to
its teacher on held-out data, and black-box teacher answers written as valid SFT rows.
`pytest tests/test_distill.py`."""

import argparse
import json

import pytest
import torch
from conftest import SMALL

from minimind import MiniMindError
from minimind.checkpoint import load_model, save_model
from minimind.commands.data import add_distill_parser
from minimind.config import ModelConfig
from minimind.data.formats import iter_rows, parse_row
from minimind.model import MiniMindForCausalLM
from minimind.recipes.distill import heldout_kl
from minimind.tokenizer import load_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.distill import DistillStage, distill_file, kd_kl
from minimind.train.loop import train


def test_kd_kl_forward_and_reverse_equal_hand_computed_values():
    s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    for temp in (1.0, 2.0):
        ps, pt = torch.softmax(s / temp, -1)[0].tolist(), torch.softmax(t / temp, -1)[0].tolist()
        forward = sum(b * torch.log(torch.tensor(b / a)).item() for a, b in zip(ps, pt))
        reverse = sum(a * torch.log(torch.tensor(a / b)).item() for a, b in zip(ps, pt))
        assert float(kd_kl(s, t, temp)) == pytest.approx(forward, abs=1e-6)
        assert float(kd_kl(s, t, temp, reverse=True)) == pytest.approx(reverse, abs=1e-6)
    assert float(kd_kl(t, t, 1.5)) == pytest.approx(0.0, abs=1e-7)


def student_dir(tmp_path, tokenizer, seed=1, **overrides):
    """A small random model directory with the given tokenizer (so it shares the teacher's vocabulary)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**SMALL, "vocab_size": len(tokenizer), **overrides})
    out = tmp_path / f"student{seed}"
    save_model(MiniMindForCausalLM(cfg), out, tokenizer)
    return out


def test_stage_loss_mixes_ce_and_scaled_kl_on_assistant_tokens(tokenizer, tmp_path):
    teacher = student_dir(tmp_path, tokenizer, seed=2)
    cfg = TrainConfig(stage="distill", teacher=str(teacher), kd_alpha=0.3, kd_temperature=2.0)
    stage = DistillStage(cfg, tokenizer)
    model = load_model(student_dir(tmp_path, tokenizer, seed=3))
    stage.setup(model, torch.device("cpu"))
    ids = torch.randint(3, len(tokenizer), (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    total, n, extras = stage.loss(model, {"input_ids": ids, "labels": labels})
    with torch.no_grad():
        s, t = model(ids).logits, load_model(teacher)(ids).logits
    ce, kl, count = 0.0, 0.0, 0
    for b in range(2):
        for pos in range(11):
            if labels[b, pos + 1] != -100:
                ce -= float(torch.log_softmax(s[b, pos], -1)[labels[b, pos + 1]])
                p_t, p_s = torch.softmax(t[b, pos] / 2, -1), torch.softmax(s[b, pos] / 2, -1)
                kl += float((p_t * (p_t.log() - p_s.log())).sum())
                count += 1
    assert n == count == 7 + 4
    assert float(total.detach()) == pytest.approx(0.7 * ce + 0.3 * 4 * kl, rel=1e-4)
    assert float(extras["kl"]) == pytest.approx(kl / count, rel=1e-4)


def test_a_teacher_with_another_tokenizer_is_refused(tokenizer, sft_model_dir, tmp_path):
    cfg = TrainConfig(stage="distill", teacher=str(sft_model_dir))
    stage = DistillStage(cfg, tokenizer)  # the 400-token test tokenizer, not the fixture model's 800
    with pytest.raises(MiniMindError, match="teacher's tokenizer differs from the student's"):
        stage.setup(load_model(student_dir(tmp_path, tokenizer)), torch.device("cpu"))
    with pytest.raises(MiniMindError, match="distill needs a teacher"):
        DistillStage(TrainConfig(stage="distill"), tokenizer)


def test_white_box_distillation_brings_the_student_closer_to_its_teacher(sft_model_dir, demo_data, tmp_path):
    tokenizer = load_tokenizer(sft_model_dir)
    start = student_dir(tmp_path, tokenizer, seed=5, max_position_embeddings=2048)
    teacher = load_model(sft_model_dir)
    before = heldout_kl(load_model(start), teacher, tokenizer, demo_data["sft_val"])
    cfg = TrainConfig(stage="distill", out=str(tmp_path / "distill"), data=str(demo_data["sft"]),
                      init_from=str(start), teacher=str(sft_model_dir), seq_len=128, batch_size=8, steps=25,
                      lr=3e-3, warmup_steps=2, log_every=5, workers=1, progress=False, threads=2, dtype="float32")
    after = heldout_kl(load_model(train(cfg, DistillStage)), teacher, tokenizer, demo_data["sft_val"])
    print(f"held-out KL(teacher || student) per assistant token: {before:.3f} -> {after:.3f}")
    assert after < 0.6 * before
    records = [json.loads(line) for line in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kl"] < records[0]["kl"] and "ce" in records[-1]


def test_black_box_distillation_writes_valid_sft_rows(sft_model_dir, demo_data, tmp_path):
    out = tmp_path / "distill.jsonl"
    # The fixture model is barely trained (greedy, it only writes newlines): sample, so answers have text.
    counts = distill_file(sft_model_dir, demo_data["rl"], out, batch_size=4, max_new_tokens=40, limit=6,
                          temperature=1.0, keep_truncated=True, progress=False)
    assert counts["prompts"] == 6 and counts["written"] + counts["empty"] == 6 and counts["written"] >= 4
    prompts = [row for _, row in iter_rows(demo_data["rl"], "rl")][:6]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == counts["written"]
    for row in written:
        parsed = parse_row(row, "sft")
        assert parsed["messages"][-1]["role"] == "assistant"
        assert parsed["messages"][:-1] in [p["messages"] for p in prompts]  # the prompt, unchanged

    # The CLI wiring: a 2-token budget cuts every answer, and by default cut answers are dropped.
    parser = argparse.ArgumentParser()
    add_distill_parser(parser.add_subparsers(dest="action"))
    args = parser.parse_args(["distill", "--teacher", str(sft_model_dir), "--prompts", str(demo_data["rl"]),
                              "--out", str(tmp_path / "cut.jsonl"), "--limit", "3", "--max-new-tokens", "2",
                              "--temperature", "0"])
    args.func(args)
    assert (tmp_path / "cut.jsonl").read_text() == ""
    with pytest.raises(MiniMindError, match="no such file"):
        distill_file(sft_model_dir, tmp_path / "missing.jsonl", out, progress=False)
