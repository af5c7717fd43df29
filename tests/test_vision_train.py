"""Vision training on the one loop: vision-pretrain / vision-sft from a language model or a vision model
directory, MiniMind-V's freezing, falling loss, exact resume, DDP with image-less batches, the vision demo."""

import json
import re
import shutil

import pytest
import torch
from conftest import small_model
from PIL import Image
from safetensors.torch import load_file

from minimind import MiniMindError, cli
from minimind.checkpoint import load_model, save_model
from minimind.data.images import make_vision
from minimind.data.vision import write_vision_parquet
from minimind.tokenizer import save_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.loop import train
from minimind.train.vision import VisionPretrainStage, VisionSFTStage, VisionTowerStage
from minimind.vision.model import VisionLanguageModel


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """A 3-layer language model directory and small built-in image sets (64x64): colour questions, captions,
    and the questions with text-only rows between them (MiniMind-V's: an 8x8 black stand-in image)."""
    d = tmp_path_factory.mktemp("vtrain")
    save_model(small_model("qwen3", vocab_size=len(tokenizer), num_hidden_layers=3), d / "llm", tokenizer)
    save_tokenizer(tokenizer, d / "tok")
    write_vision_parquet(d / "colour.parquet", make_vision(16, seed=0, kinds=["colour"], size=64))
    write_vision_parquet(d / "captions.parquet", make_vision(16, seed=0, kinds=["shape"], size=64, captions=True))
    write_vision_parquet(d / "scenes.parquet", make_vision(24, seed=0, kinds=["shape", "count"], size=64))
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    text = [{"conversations": [{"role": "user", "content": f"{a} + {b}?"},
                               {"role": "assistant", "content": f"{a + b}."}], "images": [buf.getvalue()]}
            for a in range(1, 5) for b in range(1, 4)]
    rows = make_vision(4, seed=1, kinds=["colour"], size=64)
    write_vision_parquet(d / "mixed.parquet", [dict(conversations=r["conversations"], images=r["images"])
                                               for r in rows] + text)
    return d


def opts(setup, run, **kw) -> TrainConfig:
    base = dict(data=str(setup / "colour.parquet"), init_from=str(setup / "llm"), out=str(run), seq_len=192,
                batch_size=4, steps=8, lr=3e-3, warmup_steps=1, log_every=1, progress=False, threads=1,
                dtype="float32")
    return TrainConfig(**{**base, **kw})


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def weights(path):
    return load_file(path / "model.safetensors")


def test_pretrain_trains_the_projector_only_then_sft_the_first_and_last_layers(setup, tmp_path):
    llm = load_model(setup / "llm")
    start = VisionLanguageModel.from_llm(llm, None, seed=42).state_dict()  # the stage builds it from cfg.seed
    out = train(opts(setup, tmp_path / "pre", data=str(setup / "captions.parquet"), steps=3), VisionPretrainStage)
    assert json.loads((out / "config.json").read_text())["minimind"]["vision"]["encoder"]["image_size"] == 64
    pre = weights(out)
    changed = {k for k in pre if not torch.equal(pre[k], start[k])}
    assert changed == {k for k in pre if k.startswith("vision_proj.")}  # freeze_llm 2 (its default)

    # vision-sft from that vision model: the projector and decoder layers 0 and 2 (the last) train, the tower too
    # when asked; embeddings (tied to the head), layer 1 and the final norm stay.
    out = train(opts(setup, tmp_path / "sft", init_from=str(out), steps=3, train_encoder=True), VisionSFTStage)
    sft = weights(out)
    changed = {k.split(".")[0] + "." + k.split(".")[2] if k.startswith("model.layers.") else k.split(".")[0]
               for k in sft if not torch.equal(sft[k], pre[k])}
    assert changed == {"vision_proj", "vision_encoder", "model.0", "model.2"}
    with pytest.raises(MiniMindError, match="is a vision model already"):
        train(opts(setup, tmp_path / "bad", init_from=str(out), vision_encoder=str(setup / "llm")), VisionSFTStage)


def test_loss_falls_through_the_cli(setup, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "vision-sft", "--data", str(setup / "colour.parquet"), "--init-from", str(setup / "llm"),
            "--out", str(run), "--seq-len", "192", "--batch-size", "8", "--steps", "16", "--lr", "3e-3",
            "--warmup-steps", "1", "--log-every", "1", "--no-progress", "--threads", "1", "--dtype", "float32",
            "--freeze-llm", "0", "--train-encoder"]
    assert cli.main(argv) == 0
    assert "freeze_llm 0" in capsys.readouterr().out
    curve = losses(run)
    assert len(curve) == 16 and sum(curve[-3:]) / 3 < 0.7 * sum(curve[:3]) / 3, curve
    assert isinstance(load_model(run / "model"), VisionLanguageModel)


@pytest.mark.parametrize("stage", [VisionSFTStage, VisionTowerStage])
def test_resume_equals_the_uninterrupted_run(setup, tmp_path, stage):
    # vision-sft with dropout on and the tower training: weights, both RNG streams and the data position must all
    # come back. vision-tower: its heads are in the checkpoints only (the saved model drops them).
    kw = dict(steps=6, save_every=3, keep_last=2)
    kw |= dict(dropout=0.1, train_encoder=True, freeze_llm=1) if stage is VisionSFTStage else \
        dict(data=str(setup / "scenes.parquet"), batch_size=8)
    train(opts(setup, tmp_path / "straight", **kw), stage)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "straight", crashed)
    shutil.rmtree(crashed / "model")
    shutil.rmtree(crashed / "checkpoints" / "step_6")
    (crashed / "checkpoints" / "latest").write_text("step_3\n")
    train(opts(setup, crashed, resume=True, **kw), stage)
    a, b = weights(tmp_path / "straight" / "model"), weights(crashed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(crashed) == losses(tmp_path / "straight")


def test_tower_stage_learns_the_scene_labels_and_saves_a_vision_model_without_heads(setup, tmp_path):
    write_vision_parquet(tmp_path / "scenes.parquet", make_vision(24, seed=0, kinds=["shape", "count", "size"]))
    start = VisionLanguageModel.from_llm(load_model(setup / "llm"), None, seed=42).state_dict()
    # Each step the whole set (24 images), so the losses compare.
    out = train(opts(setup, tmp_path / "tower", data=str(tmp_path / "scenes.parquet"), batch_size=24, steps=10,
                     lr=3e-3, warmup_steps=1), VisionTowerStage)
    curve = losses(tmp_path / "tower")
    assert len(curve) == 10 and curve == sorted(curve, reverse=True) and curve[-1] < 0.75 * curve[0], curve
    tower = weights(out)
    assert tower.keys() == {k for k in start if k != "lm_head.weight"}  # no head left (lm_head is tied)
    changed = {k for k in tower if not torch.equal(tower[k], start[k])}
    assert changed and all(k.startswith("vision_encoder.") for k in changed)  # decoder and projector as built
    # vision-pretrain goes on from it with the tower frozen (as the demo runs it)
    pre = weights(train(opts(setup, tmp_path / "pre", data=str(setup / "captions.parquet"), init_from=str(out),
                             steps=2, freeze_llm=0), VisionPretrainStage))
    assert all(torch.equal(pre[k], tower[k]) for k in tower if k.startswith("vision_encoder."))
    rows = [{k: r[k] for k in ("conversations", "images")} for r in make_vision(2, seed=0, kinds=["colour"])]
    write_vision_parquet(tmp_path / "nokey.parquet", rows)
    with pytest.raises(MiniMindError, match=r"nokey\.parquet: no `key`"):
        train(opts(setup, tmp_path / "bad", data=str(tmp_path / "nokey.parquet")), VisionTowerStage)


def test_configs_hold_minimind_v_settings():
    from minimind.train.config import load_config

    pre = load_config("configs/minimind-3v_pretrain.toml", stage="vision-pretrain")
    sft = load_config("configs/minimind-3v_sft.toml", stage="vision-sft")
    assert (pre.freeze_llm, pre.lr, pre.seq_len, pre.batch_size, pre.train_encoder) == (2, 4e-4, 450, 16, False)
    assert (sft.freeze_llm, sft.lr, sft.seq_len, sft.batch_size, sft.train_encoder) == (1, 5e-6, 768, 4, False)


@pytest.mark.slow  # two torchrun processes: ~20 s of CPU
def test_ddp_with_image_less_batches_matches_one_process(setup, tmp_path):
    """Micro-batches of one row, most of them text-only: a process whose batch has no image leaves the projector
    and tower without gradients, which DDP must be told to expect (find_unused_parameters)."""
    import os
    import subprocess
    import sys

    args = ["--data", str(setup / "mixed.parquet"), "--init-from", str(setup / "llm"), "--seq-len", "192",
            "--batch-size", "1", "--global-batch-tokens", str(2 * 192), "--steps", "6", "--lr", "3e-3",
            "--warmup-steps", "1", "--log-every", "1", "--no-progress", "--threads", "1", "--dtype", "float32",
            "--freeze-llm", "1", "--train-encoder", "--group-by-length", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for nproc, run in ((1, "one"), (2, "two")):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={nproc}", "-m", "minimind", "train", "vision-sft", *args,
                               "--out", str(tmp_path / run)], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    a, b = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_vision_demo_quick_runs_and_reports_accuracy_per_kind(sft_model_dir, tmp_path):
    from minimind.data.images import CHANCE
    from minimind.recipes.vision import KINDS

    assert cli.main(["demo", "--vision", "--quick", "--out", str(tmp_path), "--vision-from", str(sft_model_dir)]) == 0
    report = (tmp_path / "vision" / "report.md").read_text()
    for kind in KINDS:  # one table row per kind: questions, accuracy, chance
        assert re.search(rf"\| {kind} \| 2 \| \d+% \| {CHANCE[kind]:.0%} \|", report), report
    images = re.findall(r"!\[\w+\]\((samples/\w+\.png)\)", report)
    assert len(images) == 2 * len(KINDS)
    for name in images:
        assert Image.open(tmp_path / "vision" / name).size == (64, 64)
    assert isinstance(load_model(tmp_path / "vision" / "seed0" / "sft" / "model"), VisionLanguageModel)
    assert cli.main(["demo", "--vision", "--quick", "--out", str(tmp_path / "none")]) == 2  # no SFT model there
