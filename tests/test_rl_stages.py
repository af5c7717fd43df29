"""The PPO, agent and reward-model stages run on the one loop: PPO's value head trains and is left out of the
saved model, the agent stage logs tool use, and a reward model learns preference pairs and scores replies."""

import json
import math

import pytest
from conftest import small_model
from safetensors.torch import load_file

from minimind.checkpoint import save_model
from minimind.data.tasks import make_dpo_pairs, make_tasks, prompt_row
from minimind.rl.rewards import Sample, score
from minimind.train.agent import AgentStage
from minimind.train.config import TrainConfig
from minimind.train.grpo import GRPOStage
from minimind.train.loop import train
from minimind.train.ppo import PPOStage
from minimind.train.reward import RewardModel, RewardStage


@pytest.fixture(scope="module")
def start(tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("rl_stages")
    model = small_model("qwen3", vocab_size=len(tokenizer), max_position_embeddings=2048)
    init = save_model(model, d / "init", tokenizer)
    rows = make_tasks(12, 0, ["units", "calculator"])
    (d / "rl.jsonl").write_text("".join(json.dumps(prompt_row(t), ensure_ascii=False) + "\n" for t in rows))
    (d / "units.jsonl").write_text("".join(json.dumps(prompt_row(t), ensure_ascii=False) + "\n"
                                           for t in rows if t["task"] == "units"))
    (d / "dpo.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n"
                                         for p in make_dpo_pairs(make_tasks(8, 0, ["units"]), 0)))
    return d, init


def common(d, init, run, **kw):
    return TrainConfig(**{**dict(out=str(d / run), data=str(d / "rl.jsonl"), init_from=str(init), steps=2,
                                 batch_size=2, max_gen_len=6, seq_len=1200, max_total_len=1300, lr=1e-2,
                                 warmup_steps=1, log_every=1, progress=False, threads=1, dtype="float32",
                                 rollout_every=1), **kw})


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ppo_trains_actor_and_critic_and_saves_a_plain_model(start):
    d, init = start
    out = train(common(d, init, "ppo", stage="ppo", data=str(d / "units.jsonl"), update_epochs=2, kl_coef=0.02,
                       rewards="repetition:1,length:1,format:1"), PPOStage)
    m = metrics(d / "ppo")
    assert len(m) == 2 and m[0]["grad_norm"] > 0 and "value_loss" in m[0]
    assert m[1]["clip_frac"] >= 0 and m[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
    saved = load_file(out / "model.safetensors")
    assert not any("value_head" in k for k in saved)
    assert any(abs(float((saved[k] - v).abs().max())) > 0 for k, v in load_file(init / "model.safetensors").items())


def test_agent_stage_runs_tool_rollouts_and_logs_tool_use(start):
    d, init = start
    train(common(d, init, "agent", stage="agent", num_generations=2, max_turns=2,
                 rewards="answer:1,tool:1,format:0.2"), AgentStage)
    m = metrics(d / "agent")
    assert {"reward_tool", "reward_tool_correct", "reward_answer"} <= m[-1].keys()
    rollouts = [json.loads(line) for line in (d / "agent" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 2 * 2 and all("tool_calls" in r for r in rollouts)


def test_reward_model_learns_pairs_and_scores_rl_samples(start, tokenizer):
    d, init = start
    cfg = TrainConfig(stage="reward", out=str(d / "rm"), data=str(d / "dpo.jsonl"), init_from=str(init), steps=12,
                      batch_size=4, seq_len=256, lr=3e-3, warmup_steps=1, log_every=1, progress=False, threads=1,
                      dtype="float32")
    out = train(cfg, RewardStage)
    m = metrics(d / "rm")
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # zero-initialised head: every margin is 0
    assert m[-1]["loss"] < 0.5 and m[-1]["pair_accuracy"] == 1.0
    assert (out / "reward_head.safetensors").is_file()
    rm = RewardModel.load(out, tokenizer)
    pair = [json.loads(line) for line in (d / "dpo.jsonl").read_text().splitlines()][0]
    row = {"messages": pair["chosen"][:-1], "tools": None}
    good, bad = (Sample(text=side[-1]["content"], row=row) for side in (pair["chosen"], pair["rejected"]))
    totals, parts = score([good, bad], {"rm": 1.0}, rm)
    assert totals[0] > totals[1] and parts["rm"] == totals


@pytest.mark.parametrize("stage", [GRPOStage, PPOStage])
def test_rl_run_resumed_from_a_checkpoint_draws_the_rollouts_of_an_uninterrupted_run(start, stage):
    """The rollout counter (it seeds the sampler), the rollouts cached for update_epochs 2 and PPO's value head
    travel in the checkpoint: resumed after step 1 (cached rollouts still to reuse) or step 2 (a fresh round
    next), a run samples, scores and steps exactly as the uninterrupted one."""
    import shutil

    d, init = start
    whole = d / f"{stage.name}_whole"
    cfg = dict(stage=stage.name, num_generations=2, update_epochs=2, steps=4, save_every=1, keep_last=4,
               kl_coef=0.02, rewards="repetition:1,length:1,format:1")
    train(common(d, init, whole.name, **cfg), stage)

    def records(run, name, after):  # a run's records past a step, less the wall-clock figures
        rows = [json.loads(line) for line in (run / name).read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows if r["step"] > after]

    for resume_at in (1, 2):
        run = d / f"{stage.name}_resumed_{resume_at}"
        shutil.copytree(whole / "checkpoints", run / "checkpoints")
        (run / "checkpoints" / "latest").write_text(f"step_{resume_at}\n")
        train(common(d, init, run.name, resume=True, **cfg), stage)
        assert records(run, "metrics.jsonl", resume_at) == records(whole, "metrics.jsonl", resume_at)
        # Both resume points draw the second round of rollouts next (rollouts.jsonl counts rounds, not steps).
        assert records(run, "rollouts.jsonl", 1) == records(whole, "rollouts.jsonl", 1)
        assert len(records(run, "rollouts.jsonl", 0)) == 2 * (2 if stage is GRPOStage else 1)
