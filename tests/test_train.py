"""The training loop: schedule, data order, accumulation, falling loss, exact resume after SIGKILL, DDP."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import CORPUS, small_model
from safetensors.torch import load_file

from minimind import MiniMindError
from minimind.checkpoint import save_model
from minimind.config import ModelConfig
from minimind.tokenizer import save_tokenizer
from minimind.train.config import TrainConfig, load_config
from minimind.train.loop import (
    Clock,
    Loggers,
    Position,
    batch_flops,
    epoch_order,
    eval_due,
    evaluate,
    global_rows,
    log_step,
    lr_scale,
    make_plan,
    next_batches,
    plot_losses,
    progress_bar,
    smooth,
    train,
    validate,
)
from minimind.train.pretrain import PretrainStage
from minimind.train.stage import Dist, Stage


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("train")
    lines = [json.dumps({"text": f"{i}: {t}"}, ensure_ascii=False) for i in range(60) for t in CORPUS]
    (d / "pretrain.jsonl").write_text("\n".join(lines) + "\n")
    save_tokenizer(tokenizer, d / "tok")
    # A 64-wide model for the Muon runs: torch's Muon orthogonalises in bfloat16, which CPUs without native
    # bfloat16 matmuls run slowly (over a second a step for the tiny preset's matrices).
    save_model(small_model("qwen3", vocab_size=len(tokenizer)), d / "small", tokenizer)
    return d


def optimizer_settings(corpus, optimizer: str) -> dict:
    return dict(optimizer=optimizer, init_from=corpus / "small") if optimizer == "muon" else {}


def settings(corpus, run, **kw) -> list[str]:
    base = dict(data=corpus / "pretrain.jsonl", tokenizer=corpus / "tok", out=run, seq_len=32, batch_size=4,
                steps=12, lr=3e-3, warmup_steps=2, log_every=1, progress="false", threads=1, workers=1,
                dtype="float32")
    base.update(kw)
    out = []
    for k, v in base.items():
        out += [f"--{k}", str(v)]
    return out


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=3.0, min_lr_ratio=0.1, warmup_steps=10)
    assert lr_scale(cfg, 0, 110) == pytest.approx(0.1)
    assert lr_scale(cfg, 9, 110) == pytest.approx(1.0)
    assert lr_scale(cfg, 60, 110) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_scale(cfg, 110, 110) == pytest.approx(0.1)


def test_data_order_is_a_shuffle_per_epoch_and_splits_anywhere():
    rows = global_rows(10, 0, 30, seed=1)
    for epoch in range(3):
        assert sorted(rows[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert rows[:10] != rows[10:20]
    assert global_rows(10, 0, 7, 1) + global_rows(10, 7, 16, 1) == rows[:23]


def test_length_grouping_keeps_each_epoch_a_permutation_and_steps_tight():
    lengths = np.random.default_rng(0).integers(10, 500, size=960)
    steps = [global_rows(960, s * 16, 16, seed=3, lengths=lengths) for s in range(60)]
    assert sorted(r for step in steps for r in step) == list(range(960))
    spread = np.mean([np.ptp(lengths[step]) for step in steps])
    random_spread = np.mean([np.ptp(lengths[global_rows(960, s * 16, 16, seed=3)]) for s in range(60)])
    assert spread < random_spread / 4
    # Step order is still random: the mean length of consecutive steps is not sorted.
    means = [lengths[step].mean() for step in steps[:32]]
    assert means != sorted(means)


class RowNumbers:
    """Rows that are their own index, of the given lengths; collated, a micro-batch is its list of rows."""

    def __init__(self, lengths):
        self._lengths = lengths

    def __len__(self):
        return len(self._lengths)

    def __getitem__(self, i):
        return i

    def lengths(self):
        return self._lengths

    def collate(self, rows):
        return rows


def rows_seen(cfg, data, world, steps):
    """The rows a run of `world` processes consumes in `steps` steps, in data order (micro-batch, then rank)."""
    d = Dist()
    d.world = world
    plan = make_plan(cfg, data, d, torch.device("cpu"))
    at, seen = Position(), []
    for _ in range(steps):
        by_rank = []
        for d.rank in range(world):
            by_rank.append(next_batches(cfg, data, data, plan, at, d))
        seen += [row for m in range(plan.accum) for rank in range(world) for row in by_rank[rank][m]]
        at.step, at.samples = at.step + 1, at.samples + plan.rows_per_step
    return seen


def test_length_grouped_order_is_the_same_for_any_number_of_processes():
    # global_batch_tokens = 0: a step is batch_size rows per process, so rows per step follow the process count;
    # a run resumed under another count must still read the rows in the same order.
    data = RowNumbers(np.random.default_rng(1).integers(10, 500, size=300))
    cfg = TrainConfig(batch_size=4, seed=3)
    one = rows_seen(cfg, data, 1, 160)
    assert sorted(one[:300]) == list(range(300))  # still a permutation per epoch
    assert rows_seen(cfg, data, 2, 80) == one
    assert rows_seen(cfg, data, 4, 40) == one
    assert rows_seen(TrainConfig(batch_size=4, seed=3, seq_len=64, global_batch_tokens=8 * 4 * 64), data, 2, 20) == one
    # Each micro-batch (what is padded) holds rows of similar length.
    spread = np.mean([np.ptp(data.lengths()[one[i:i + 4]]) for i in range(0, 300, 4)])
    assert spread < 0.25 * np.mean([np.ptp(data.lengths()[i:i + 4]) for i in range(0, 300, 4)])


def test_order_cache_follows_the_lengths_not_their_id():
    # Arrays freed and allocated in turn often share an id: a cache keyed by id() would hand back the order
    # grouped by the first array's lengths.
    rng = np.random.default_rng(2)
    first = epoch_order(200, 0, 1, rng.integers(10, 500, size=200), 4).clone()
    lengths = rng.integers(10, 500, size=200)
    second = epoch_order(200, 0, 1, lengths.copy(), 4).clone()
    epoch_order(201, 0, 1)  # another key empties the one-epoch cache
    fresh = epoch_order(200, 0, 1, lengths.copy(), 4)
    assert torch.equal(second, fresh) and not torch.equal(first, fresh)


def test_config_from_toml_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[optim]\nlr = 1e-3\nseq_len = 64\n[run]\ncompile = true\nloggers = ["tensorboard"]\n')
    cfg = load_config(f, ["--lr", "2e-3", "--batch-size", "3", "--resume"], stage="sft")
    assert (cfg.lr, cfg.seq_len, cfg.batch_size, cfg.compile, cfg.resume) == (2e-3, 64, 3, True, True)
    assert cfg.loggers == ["tensorboard"] and cfg.out == "runs/sft"
    with pytest.raises(MiniMindError, match="unknown setting --lrr"):
        load_config(f, ["--lrr", "1"])
    with pytest.raises(MiniMindError, match="batch_size must be int"):
        load_config(None, ["--batch_size", "x"])
    f.write_text("nope = 1\n")
    with pytest.raises(MiniMindError, match="c.toml: unknown setting 'nope'"):
        load_config(f)


def run_cli(*args, env_extra=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "minimind", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check and proc.returncode:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def metric(run, name):
    return [r[name] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if name in r]


def losses(run):
    return metric(run, "loss")


def weights(run):
    return load_file(run / "model" / "model.safetensors")


def test_pretraining_loss_falls_and_writes_a_run_directory(corpus, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", "pretrain", *settings(corpus, run, steps=40, val_data=corpus / "pretrain.jsonl",
                                                   eval_every=20))
    assert "validation loss" in proc.stdout and "tok/s" in proc.stdout and "MFU" in proc.stdout
    assert all(m is None or 0 < m <= 1 for m in metric(run, "mfu")) and "adamw 3," in proc.stdout
    curve = losses(run)
    assert len(curve) == 40
    assert curve[-1] < 0.6 * curve[0]
    for name in ("config.toml", "metrics.jsonl", "loss.png", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json", "checkpoints/latest"):
        assert (run / name).exists(), name
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run / "model").config.model_type == "qwen3"


def test_accumulation_gives_the_same_step_as_one_big_batch(corpus, tmp_path):
    # Without doc_mask: the bound below was set on its rounding (with it, Adam amplifies rounding to 1.2e-4 here).
    common = dict(steps=2, dropout=0.0, doc_mask="false")
    train(load_config(None, settings(corpus, tmp_path / "big", batch_size=8, **common), stage="pretrain"),
          PretrainStage)
    train(load_config(None, settings(corpus, tmp_path / "acc", batch_size=2, global_batch_tokens=8 * 32,
                                     **common), stage="pretrain"), PretrainStage)
    # The gradient norm (before clipping) shows the scale is right: Adam's update alone would hide a factor.
    assert metric(tmp_path / "big", "grad_norm") == pytest.approx(metric(tmp_path / "acc", "grad_norm"), rel=1e-4)
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "acc"), rel=1e-5)
    a, b = weights(tmp_path / "big"), weights(tmp_path / "acc")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.02 * 3e-3  # rounding only, far below one lr step


# AdamW's exact resume is also held in-process by test_resume_cleans_debris_...; its SIGKILL run is in the slow set.
@pytest.mark.parametrize("optimizer", [pytest.param("adamw", marks=pytest.mark.slow), "muon"])
def test_sigkill_then_resume_is_bit_identical(corpus, tmp_path, optimizer):
    # Dropout is on, so the RNG state must be restored too for the runs to agree bit for bit; under Muon, both
    # optimizers' states (Muon's momentum, AdamW's moments) must come back too.
    opts = dict(steps=30, save_every=4, keep_last=2, dropout=0.1, **optimizer_settings(corpus, optimizer))
    run_cli("train", "pretrain", *settings(corpus, tmp_path / "straight", **opts))

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minimind", "train", "pretrain", *settings(corpus, killed, **opts)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 14:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "training finished before it could be killed"
    latest = (killed / "checkpoints" / "latest").read_text().strip()
    assert latest in ("step_12", "step_16")
    assert len(list((killed / "checkpoints").glob("step_*"))) <= 3  # keep_last (+ the one being written)
    run_cli("train", "pretrain", *settings(corpus, killed, **opts), "--resume")
    a, b = weights(tmp_path / "straight"), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_cleans_debris_drops_rerun_metrics_and_falls_back_to_an_intact_checkpoint(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"

    def opts(**kw):
        return load_config(None, settings(corpus, run, steps=8, save_every=2, keep_last=3, **kw), stage="pretrain")

    def debris():  # what atomic_path leaves when a kill lands mid-write (the real one is the checkpoint's size)
        (checkpoints / ".step_10.k1ll3d00" / "step_10").mkdir(parents=True)
        (checkpoints / ".step_10.k1ll3d00" / "step_10" / "model.safetensors").write_bytes(b"\0" * 1000)
        (checkpoints / ".latest.k1ll3d00").mkdir()

    debris()  # on a fresh run, the first save clears it
    train(opts(), PretrainStage)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_4", "step_6", "step_8"]
    straight = weights(run)
    shutil.copytree(checkpoints, tmp_path / "other" / "checkpoints")  # another run, with intact checkpoints

    # A kill: debris, a metrics line cut short, and then two damaged checkpoints (the newest first).
    debris()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "lo')
    (checkpoints / "step_8" / "trainer.pt").write_bytes(b"garbage")
    (checkpoints / "step_6" / "state.json").write_text('{"step": 6, "samp')
    capsys.readouterr()
    train(opts(resume=True), PretrainStage)
    out = capsys.readouterr().out
    assert "step_8/trainer.pt: damaged or incomplete" in out and "step_6/state.json: damaged or incomplete" in out
    assert f"resuming from {checkpoints / 'step_4'} instead" in out and "resumed from" in out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_4", "step_6", "step_8"]
    assert metric(run, "step") == list(range(1, 9))  # every line parses; steps 5-8 ran twice, are logged once
    assert (run / "loss.png").is_file()
    resumed = weights(run)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    with pytest.raises(MiniMindError, match=r'step_8: this run was trained with optimizer = "adamw", not "muon"; '
                                            r"resume it with --optimizer adamw"):
        train(opts(resume=True, optimizer="muon"), PretrainStage)

    # No intact checkpoint: one error naming each damaged file.
    for step in (4, 6, 8):
        (checkpoints / f"step_{step}" / "model.safetensors").write_bytes(b"cut")
    with pytest.raises(MiniMindError, match=r"no intact checkpoint to resume from: .*step_8/model.safetensors: "
                                            r"damaged .*step_6.*step_4/model.safetensors: damaged"):
        train(opts(resume=True), PretrainStage)
    # A pointer that leaves the run (to another run's intact checkpoint) is refused, not followed.
    (checkpoints / "latest").write_text("../../other/checkpoints/step_4\n")
    with pytest.raises(MiniMindError, match=r"latest: names '../../other/checkpoints/step_4', not a step_N "
                                            r"directory inside .*; refusing to follow it"):
        train(opts(resume=True), PretrainStage)


def torchrun(nproc, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "minimind", *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# Muon's case covers AdamW's too (its embeddings and norms are AdamW's); the AdamW-only run is in the slow set.
@pytest.mark.parametrize("optimizer", [pytest.param("adamw", marks=pytest.mark.slow), "muon"])
def test_ddp_two_processes_match_one_and_resume_across_world_sizes(corpus, tmp_path, optimizer):
    # A constant learning rate, so a run extended from 6 to 9 steps follows the same path as one planned for 9.
    opts = dict(steps=6, batch_size=2, global_batch_tokens=8 * 32, save_every=3, warmup_steps=1, min_lr_ratio=1.0,
                **optimizer_settings(corpus, optimizer))
    run_cli("train", "pretrain", *settings(corpus, tmp_path / "one", **opts))
    torchrun(2, "train", "pretrain", *settings(corpus, tmp_path / "two", **opts))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    # Muon orthogonalises in bfloat16: gradients summed in another order round to a neighbouring bfloat16 now
    # and then, which moves a weight by ~1e-5 a step (lr 3e-3 x 2.3 x 2^-8 x |update| < 1).
    assert max((a[k] - b[k]).abs().max().item() for k in a) < (1e-4 if optimizer == "adamw" else 5e-4)
    # A one-process checkpoint continues under two processes, at the same row of the data.
    longer = dict(opts, steps=9)
    proc = torchrun(2, "train", "pretrain", *settings(corpus, tmp_path / "one", **longer), "--resume")
    assert "1 process(es) then, 2 now" in proc.stdout
    run_cli("train", "pretrain", *settings(corpus, tmp_path / "ref", **longer))
    assert losses(tmp_path / "one")[-3:] == pytest.approx(losses(tmp_path / "ref")[-3:], rel=1e-4)


@pytest.mark.slow  # two torchrun processes: in CI's slow set (`pytest -m slow`)
def test_ddp_sft_with_padding_and_accumulation_matches_one_process_and_resumes_under_one(corpus, tmp_path):
    # Conversations of many lengths, so micro-batches are padded and hold different numbers of loss tokens: the
    # loss must be the sum over the global batch / its tokens, not a mean of micro-batch means.
    rng = np.random.default_rng(4)
    chats = [{"conversations": [{"role": "user", "content": rng.choice(CORPUS)[: rng.integers(3, 30)]},
                                {"role": "assistant", "content": rng.choice(CORPUS)[: rng.integers(3, 30)]}]}
             for _ in range(60)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    # One validation row: the second process gets no validation batch and must not wait on the first.
    (tmp_path / "val.jsonl").write_text(json.dumps({"conversations": [{"role": "user", "content": "2 + 2?"},
                                                                      {"role": "assistant", "content": "4"}]}) + "\n")
    opts = dict(data=tmp_path / "sft.jsonl", val_data=tmp_path / "val.jsonl", eval_every=3, seq_len=96, steps=6,
                batch_size=2, global_batch_tokens=8 * 96, save_every=3, warmup_steps=1, min_lr_ratio=1.0,
                dropout=0.0)
    run_cli("train", "sft", *settings(corpus, tmp_path / "one", **opts))
    torchrun(2, "train", "sft", *settings(corpus, tmp_path / "two", **opts))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert metric(tmp_path / "two", "val_loss") == pytest.approx(metric(tmp_path / "one", "val_loss"), rel=1e-4)
    assert len(metric(tmp_path / "one", "val_loss")) == 2 and metric(tmp_path / "one", "val_loss")[0] > 0
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    # The two-process checkpoint continues in one process, at the same row of the same order.
    longer = dict(opts, steps=9)
    proc = run_cli("train", "sft", *settings(corpus, tmp_path / "two", **longer), "--resume")
    assert "2 process(es) then, 1 now" in proc.stdout
    run_cli("train", "sft", *settings(corpus, tmp_path / "ref", **longer))
    assert losses(tmp_path / "two")[-3:] == pytest.approx(losses(tmp_path / "ref")[-3:], rel=1e-4)


def test_time_budget_shortens_the_run(corpus, tmp_path):
    run = tmp_path / "budget"
    train(load_config(None, settings(corpus, run, steps=100000, time_budget=4), stage="pretrain"), PretrainStage)
    steps = metric(run, "loss")
    latest = (run / "checkpoints" / "latest").read_text().strip()
    done = int(latest.split("_")[1])
    assert 4 <= done < 100000 and len(steps) == done
    state = json.loads((run / "checkpoints" / latest / "state.json").read_text())
    assert state["total"] == done


@pytest.mark.slow  # two torchrun processes: in CI's slow set (`pytest -m slow`)
def test_time_budget_under_two_processes_stops_both_at_the_same_step(corpus, tmp_path):
    # Each process reads its own clock; the run length they settle on must be rank 0's, or one rank leaves the
    # loop while the other waits for it in an all-reduce (the run then hangs until torchrun's timeout).
    run = tmp_path / "budget"
    torchrun(2, "train", "pretrain", *settings(corpus, run, steps=100000, time_budget=4, save_every=0))
    done = len(metric(run, "loss"))
    state = json.loads((run / "checkpoints" / f"step_{done}" / "state.json").read_text())
    assert 4 <= done < 100000 and state["total"] == done


def test_right_by_kind_counts_pairs_ranked_right_per_family_and_kind():
    from minimind.recipes.demo import right_by_kind

    pairs = [{"task": "units"}, {"task": "units"}, {"task": "units", "kind": "repetition"}, {}]
    assert right_by_kind(pairs, [0.5, -0.1, 0.2, 0.0], [0.4, 0.3, -0.2, 0.1]) == {
        "other answer": (0, 1, 1), "units answer": (1, 2, 2), "units repetition": (1, 0, 1)}


def test_demo_quick_runs_the_whole_pipeline(tmp_path):
    from minimind.recipes.demo import QUICK

    proc = run_cli("demo", "--quick", "--all", "--out", str(tmp_path / "demo"), "--seed", "3")
    report = (tmp_path / "demo" / "report.md").read_text()
    # fixed step counts, whatever the speed: run_cli throttles the run to one thread
    assert re.search(rf"pretrain/model` \({QUICK['pretrain_steps']} steps, ", report)
    assert re.search(rf"sft/model` \({QUICK['sft_steps']} steps, ", report)
    for part in ("kept after cleaning", "Tokenizer", "Pretraining", "Supervised fine-tuning", "bits per byte",
                 "held-out task accuracy",
                 "well-formed thinking", "tool tasks", "Sample chats", "LoRA", "with the LoRA adapter",
                 "preference accuracy", "By kind of pair", "KL(teacher || student)", "Reinforcement learning"):
        assert part in report, part
    # tokens/s and MFU of each trained stage: pretraining, SFT, DPO, distillation
    assert len(re.findall(r"[0-9,]+ tokens/s, MFU ([0-9]+\.[0-9]%|peak unknown)", report)) == 4
    assert (tmp_path / "demo" / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "dpo" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "distill" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "sft" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "pretrain" / "loss.png").is_file()
    assert "| near-dup |" in (tmp_path / "demo" / "data" / "clean" / "report.md").read_text()
    assert "Traceback" not in proc.stderr


def test_bad_lines_stop_training_unless_skipped(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = (corpus / "pretrain.jsonl").read_text().splitlines()
    bad.write_text("\n".join(good[:50] + ['{"text": 5}'] + good[50:]) + "\n")
    proc = run_cli("train", "pretrain", *settings(corpus, tmp_path / "r1", data=bad, steps=2), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}:51:" in proc.stderr and "--skip-bad" in proc.stderr
    proc = run_cli("train", "pretrain", *settings(corpus, tmp_path / "r2", data=bad, steps=2, skip_bad="true"))
    assert "skipped 1 bad lines" in proc.stdout


def test_sft_learns_only_the_assistant_turns(corpus, tokenizer, tmp_path):
    from minimind.chat import encode_chat
    from minimind.train.sft import SFTStage

    chats = [[{"role": "user", "content": f"What is {a} + {a}?"},
              {"role": "assistant", "content": f"The answer is {2 * a}.", "reasoning_content": f"{a} + {a}"}]
             for a in range(40)]
    # The last chat's question fills the whole context: it has no assistant token left and must be skipped.
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"conversations": c}) for c in chats + [long]) + "\n")
    cfg = load_config(None, settings(corpus, tmp_path / "sft", data=data, steps=30, seq_len=64), stage="sft")
    stage = SFTStage(cfg, tokenizer)
    rows = stage.dataset(str(data))
    assert (len(rows), rows.skipped, len(rows.data)) == (40, 1, 41)
    per_row = rows.data.loss_tokens_per_row(rows_per_chunk=7)  # chunk edges inside the data
    assert per_row.tolist() == [int(rows.data[i][1].sum()) for i in range(41)] and per_row[-1] == 0
    batch = stage.collate([rows[0], rows[1]])
    for i in range(2):
        ids, mask = encode_chat(tokenizer, chats[i])
        assert rows[i][0].tolist() == ids and rows[i][1].tolist() == mask
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        trained = [t for t, m in zip(ids, mask) if m]
        assert batch["labels"][i, :n][batch["labels"][i, :n] != -100].tolist() == trained
        assert tokenizer.decode(trained).endswith("<|im_end|>") and "What is" not in tokenizer.decode(trained)
        assert (batch["labels"][i, n:] == -100).all()
    train(cfg, SFTStage)
    curve = losses(tmp_path / "sft")
    assert curve[-1] < 0.5 * curve[0]


def test_train_newline_after_eos_gives_minimind_labels(corpus, tokenizer, tmp_path):
    """The setting makes the SFT labels MiniMind's (its rule applied to the same ids, empty think blocks dropped
    as MiniMind drops 80% of them); the default leaves out exactly one "\\n" token per assistant turn."""
    from conftest import minimind_loss_mask

    from minimind.train.sft import SFTStage

    tool = {"type": "function", "function": {"name": "add", "parameters": {}}}
    chats = [{"conversations": [{"role": "user", "content": f"What is {a} + {a}?"},
                                {"role": "assistant", "content": f"{2 * a}.", "reasoning_content": f"{a} + {a}"},
                                {"role": "user", "content": "And again?"},
                                {"role": "assistant", "content": f"Still {2 * a}."}]} for a in range(6)]
    chats.append({"tools": [tool], "conversations": [
        {"role": "user", "content": "1 + 2?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]},
        {"role": "tool", "content": "3"}, {"role": "assistant", "content": "It is 3."}]})
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    labels = {}
    for on in (False, True):
        extra = ["--train-newline-after-eos"] if on else []
        cfg = load_config(None, settings(corpus, tmp_path / "sft", data=data, seq_len=256, keep_empty_think_prob=0)
                          + extra, stage="sft")
        assert cfg.train_newline_after_eos is on
        stage = SFTStage(cfg, tokenizer)
        rows = stage.dataset(str(data))
        batch = stage.collate([rows[i] for i in range(len(rows))])
        labels[on] = batch["labels"]
        ids = [rows[i][0].tolist() for i in range(len(rows))]
    assert "<think>\n\n</think>" not in tokenizer.decode(ids[0])  # the augmentation ran
    for i, row in enumerate(ids):
        want = [t if m else -100 for t, m in zip(row, minimind_loss_mask(row, tokenizer))]
        assert labels[True][i, :len(row)].tolist() == want
        turns = sum(m["role"] == "assistant" for m in chats[i]["conversations"])
        assert int((labels[True][i] != -100).sum() - (labels[False][i] != -100).sum()) == turns


def test_tag_loss_weight_scales_only_the_tag_tokens(tokenizer):
    import torch.nn.functional as F
    from conftest import small_model

    from minimind.chat import encode_chat
    from minimind.train.sft import SFTStage

    model = small_model("qwen3", vocab_size=len(tokenizer))
    conv = [{"role": "user", "content": "3 + 4?"},
            {"role": "assistant", "content": "7", "reasoning_content": "3 + 4 = 7"}]
    ids, mask = encode_chat(tokenizer, conv)
    ids_t = torch.tensor([ids])
    batch = {"input_ids": ids_t, "labels": torch.where(torch.tensor([mask]).bool(), ids_t, -100)}
    plain, n, _ = SFTStage(TrainConfig(stage="sft"), tokenizer).loss(model, batch)
    stage = SFTStage(TrainConfig(stage="sft", tag_loss_weight=5.0), tokenizer)
    stage.setup(model, torch.device("cpu"))
    weighted, n2, _ = stage.loss(model, batch)
    per_token = F.cross_entropy(model(ids_t).logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100,
                                reduction="none")
    tags = {tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")}
    is_tag = torch.tensor([t in tags for t in batch["labels"][0, 1:].tolist()])
    assert is_tag.sum() == 2  # the assistant writes both tags
    assert n == n2 == sum(mask[1:])
    assert torch.allclose(plain, per_token.sum(), atol=1e-5)
    assert torch.allclose(weighted, per_token.sum() + 4 * per_token[is_tag].sum(), atol=1e-5)


def test_batch_flops_count_real_tokens_causal_pairs_and_the_head_at_targets_only():
    from minimind.train.sft import SFTStage

    cfg = ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=128, vocab_size=320)
    # Three chats of 5, 9 and 3 tokens (one with id 0 inside it: only trailing zeros are padding), padded to 9.
    chats = [([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]), ([4, 5, 6, 0, 7, 8, 9, 10, 11], [0, 0, 0, 0, 1, 1, 1, 1, 0]),
             ([3, 4, 5], [0, 1, 1])]
    stage = SFTStage(TrainConfig(stage="sft"), None)
    batch = stage.collate([(np.array(ids), np.array(mask)) for ids, mask in chats])
    assert batch["input_ids"].shape == (3, 9)
    lengths, head = stage.flop_shape(batch)
    assert lengths == [5, 9, 3] and head == 3 + 4 + 2  # a label at position 0 predicts nothing
    # By hand, forward: per real token 2 x 2 layers x (q 64x64 + k, v 64x32 + o 64x64 + gate, up, down 64x128);
    # per causal (query, key) pair 2 x 2 x 2 layers x 4 heads x 16; per head position 2 x 64 x 320. Training: x 3.
    per_token = 2 * 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    pairs = 15 + 45 + 6
    assert batch_flops(cfg, lengths, head) == 3 * (17 * per_token + pairs * 2 * 2 * 2 * 4 * 16 + 9 * 2 * 64 * 320)
    # LoRA's frozen base: forward and input gradients, no weight gradients
    from minimind.train.lora import LoRAStage

    assert batch_flops(cfg, lengths, head, LoRAStage.passes) == 2 / 3 * batch_flops(cfg, lengths, head)
    # Other stages (DPO pairs: right-padded, the head everywhere), with or without an attention_mask.
    pairs_batch = {"input_ids": torch.tensor([[5, 6, 0, 7, 0, 0], [5, 6, 7, 8, 9, 4]])}
    assert Stage.flop_shape(None, pairs_batch) == ([4, 6], 10)
    assert Stage.flop_shape(None, {**pairs_batch, "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1]] * 2)}) == (
        [5, 5], 10)
    # Packed pretraining rows: full length, the head at every position but the last.
    assert PretrainStage.flop_shape(None, {"input_ids": torch.ones(2, 8, dtype=torch.long),
                                           "labels": torch.ones(2, 8, dtype=torch.long)}) == ([8, 8], 14)


def test_mfu_over_100_percent_says_peak_unknown_and_records_null(tmp_path, capsys):
    loggers = Loggers(TrainConfig(), tmp_path)
    bar = progress_bar(10, 0, True, False)
    for peak in (1e3, 1e30):  # a probe that read absurdly low, then a plausible one
        clock = Clock(start_step=0, planned=10)
        clock.flops_since, clock.tokens_since = 1e9, 100
        log_step(1, 10, 2.0, 1e-3, 0.5, {}, peak, clock, torch.device("cpu"), Dist(), bar, loggers)
    lines = capsys.readouterr().out.splitlines()
    assert "MFU peak unknown" in lines[0] and "MFU 0.0%" in lines[1]
    assert [r["mfu"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] == [None, 0.0]


def test_validation_runs_evals_times_spread_over_the_run_or_every_n_steps():
    assert [s for s in range(1, 101) if eval_due(TrainConfig(evals=8), s, 100)] == [13, 26, 39, 52, 65, 78, 91, 100]
    assert [s for s in range(1, 101) if eval_due(TrainConfig(eval_every=30), s, 100)] == [30, 60, 90, 100]
    assert [s for s in range(1, 7) if eval_due(TrainConfig(evals=1), s, 6)] == [6]


def test_validation_curve_points_read_a_prefix_of_the_full_evaluation(tmp_path):
    from contextlib import nullcontext

    model, stage, cpu = small_model("qwen3"), PretrainStage(TrainConfig(), None), torch.device("cpu")
    rows = [(np.random.default_rng(i).integers(3, 320, 16), None) for i in range(10)]
    cfg = TrainConfig(batch_size=2, eval_batches=5)  # the curve's points read 5 // 5 = 1 batch
    full, part = evaluate(model, stage, rows, 5, 1, cfg, cpu, nullcontext(), Dist())
    assert part == pytest.approx(evaluate(model, stage, rows, 1, 0, cfg, cpu, nullcontext(), Dist())[0], rel=1e-6)
    assert abs(part - full) > 1e-4
    for c in (cfg, TrainConfig(batch_size=2, eval_batches=5, eval_every=5)):
        run = tmp_path / str(c.eval_every)
        run.mkdir()
        loggers, bar = Loggers(c, run), progress_bar(10, 0, True, False)
        for step in (5, 10):
            validate(model, stage, rows, c, cpu, nullcontext(), Dist(), step, 10, bar, loggers)
        plot_losses(run / "metrics.jsonl", run / "loss.png")
        assert (run / "loss.png").is_file()
    records = [json.loads(line) for line in (tmp_path / "0" / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 5, "val_loss_subset": round(part, 6)},
                       {"step": 10, "val_loss": round(full, 6), "val_loss_subset": round(part, 6)}]
    assert metric(tmp_path / "5", "val_loss") == [round(full, 6)] * 2  # eval_every: full evaluations only
    assert metric(tmp_path / "5", "val_loss_subset") == []


def test_the_plotted_train_curve_is_a_centred_moving_average():
    assert smooth([1.0, 3.0, 2.0, 6.0, 4.0], 1) == pytest.approx([2.0, 2.0, 11 / 3, 4.0, 5.0])
