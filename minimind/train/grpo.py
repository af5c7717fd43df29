"""GRPO and CISPO on the one training loop: each step samples a group of replies per prompt from the current
policy, scores them with verifiable rewards and pushes up the better-than-group ones. `minimind train grpo
--config configs/grpo.toml` (also under `torchrun --nproc_per_node N -m minimind train grpo ...`)."""

from __future__ import annotations

import copy
import json
import random
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minimind import MiniMindError
from minimind.chat import encode_chat
from minimind.data.formats import decode_line, parse_row, read_lines
from minimind.data.tasks import FAMILIES, REASONING_FAMILIES
from minimind.device import pick_dtype
from minimind.generation import SamplingParams
from minimind.logprobs import token_entropy, token_logprobs
from minimind.rl.rewards import Sample, parse_weights, score
from minimind.rl.rollout import Rollout, TorchEngine, sample, sequence_logprobs, to_batch
from minimind.train.config import TrainConfig
from minimind.train.stage import Batch, Dist, Stage

# ---- the maths (pure functions: the tests check them against hand-computed values) ----------------------


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage: each reward minus its group's mean, over the group's standard deviation (unbiased,
    as MiniMind and TRL) + eps. rewards [P * group] -> [P * group]; a group of equal rewards gives 0."""
    r = rewards.float().view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).flatten()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(policy || reference) per sampled token: exp(d) - d - 1, d = ref - policy.
    Unbiased, never negative."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                    beta: float, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token GRPO loss -(min(r A, clip(r, 1-eps, 1+eps) A) - beta k3), r = exp(logp - old_logp); and
    where the clipped branch was the one taken (its gradient is zero there)."""
    ratio = torch.exp(logp - old_logp)
    plain, clipped = ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages
    loss = -(torch.minimum(plain, clipped) - beta * k3_kl(logp, ref_logp))
    return loss, clipped < plain


def cispo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                     beta: float, epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token CISPO loss -(sg(min(r, eps_high)) A logp - beta k3): the importance weight is clipped and
    detached, so every token keeps a gradient (MiniMind's default `--loss_type cispo`); and where r was capped."""
    ratio = torch.exp(logp - old_logp)
    weight = ratio.clamp(max=epsilon_high).detach()
    loss = -(weight * advantages * logp - beta * k3_kl(logp, ref_logp))
    return loss, ratio > epsilon_high


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str) -> tuple[torch.Tensor, int]:
    """(sum of per-unit losses, number of units). token: every trained token one unit (long replies weigh
    more); sequence: each reply's mean over its tokens, one unit per reply (MiniMind's GRPO)."""
    mask = mask.to(per_token.dtype)
    if how == "token":
        return (per_token * mask).sum(), int(mask.sum())
    lengths = mask.sum(1)
    has = lengths > 0
    return ((per_token * mask).sum(1)[has] / lengths[has]).sum(), int(has.sum())


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the sampled (labelled) tokens [N, T-1] (with gradient) and the policy's entropy there
    (without); both 0 at untrained positions."""
    logp = token_logprobs(logits, labels)
    entropy = torch.zeros_like(logp)
    keep = labels[:, 1:] != -100
    entropy[keep] = token_entropy(logits[:, :-1][keep])
    return logp, entropy


# ---- prompts ---------------------------------------------------------------------------------------------


@dataclass
class PromptStats:
    tokens: int = 0
    truncated: int = 0  # prompts longer than seq_len, left out
    skipped_bad: int = 0


class PromptSet:
    """RL prompt rows (conversations ending in a user turn, with `answer` / `gt`; also MiniMind's rlaif and
    agent_rl rows) with their prompt token ids. Items are row numbers: collate looks the rest up here."""

    def __init__(self, path: str, tokenizer, cfg: TrainConfig, default_tools: list[dict] | None = None) -> None:
        self.rows: list[dict] = []
        self.prompts: list[list[int]] = []
        self.thinking: list[bool] = []
        self.stats = PromptStats()
        for line, raw in read_lines(path):
            try:
                data = decode_line(raw)
                row = parse_row(data, "rl")
            except ValueError as e:
                if not cfg.skip_bad:
                    raise MiniMindError(f"{path}:{line}: {e}") from None
                self.stats.skipped_bad += 1
                continue
            row["task"] = data.get("task")
            row["line"] = line
            tools = row["tools"] or default_tools
            think = self._thinking(row, line, cfg)
            ids, _ = encode_chat(tokenizer, row["messages"], tools=tools, add_generation_prompt=True,
                                 enable_thinking=think)
            if len(ids) > cfg.seq_len:
                self.stats.truncated += 1
                continue
            self.rows.append(row)
            self.prompts.append(ids)
            self.thinking.append(think)
            self.stats.tokens += len(ids)

    @staticmethod
    def _thinking(row: dict, line: int, cfg: TrainConfig) -> bool:
        """Built-in task rows think as they were taught (worked-step families do); other rows open <think>
        for a fixed share (thinking_ratio), decided per row so every epoch asks the same way."""
        if row["task"] in FAMILIES:
            return row["task"] in REASONING_FAMILIES
        return random.Random(zlib.crc32(f"{cfg.seed}/{line}".encode())).random() < cfg.thinking_ratio

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return i


# ---- the stage -------------------------------------------------------------------------------------------


class GRPOStage(Stage):
    """GRPO / CISPO. Per optimizer step: `prepare` samples num_generations replies per prompt (no gradient,
    eval mode), scores them, forms group advantages and the reference log-probs; `loss` is the clipped
    (GRPO) or capped-weight (CISPO) policy-gradient loss with a k3 KL penalty."""

    kind = "rl"
    name = "grpo"

    def __init__(self, cfg: TrainConfig, tokenizer, dist: Dist | None = None) -> None:
        super().__init__(cfg, tokenizer, dist)
        if cfg.val_data:
            raise MiniMindError(f"{self.name}: RL stages have no validation loss; leave val_data empty "
                                "(measure with `minimind eval --task probes`)")
        if cfg.loss_type not in ("grpo", "cispo"):
            raise MiniMindError(f"loss_type must be grpo or cispo, not {cfg.loss_type!r}")
        if cfg.loss_agg not in ("sequence", "token"):
            raise MiniMindError(f"loss_agg must be sequence or token, not {cfg.loss_agg!r}")
        self.group = self.samples_per_prompt()
        if self.group < 2 and self.name != "ppo":
            raise MiniMindError(f"num_generations must be at least 2 for {self.name} (a group), not {self.group}")
        if cfg.update_epochs < 1 or cfg.max_gen_len < 1:
            raise MiniMindError("update_epochs and max_gen_len must be at least 1")
        self.weights = parse_weights(cfg.rewards)
        self.step = 0  # rollout batches drawn so far (seeds the sampler)
        self.cached: list[Batch] = []
        self.reuse_left = 0
        self.ref: torch.nn.Module | None = None
        self.reward_model = None
        self.data: PromptSet | None = None

    def samples_per_prompt(self) -> int:
        return self.cfg.num_generations

    # -- loop hooks --

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        context = model.config.max_position_embeddings
        longest = self.cfg.max_total_len if self.name == "agent" else self.cfg.seq_len + self.cfg.max_gen_len
        if longest > context:
            what = "max_total_len" if self.name == "agent" else "seq_len (prompt) + max_gen_len"
            raise MiniMindError(f"{what} = {longest} exceeds the model's context of {context} tokens")
        self.device = device
        dtype = pick_dtype(self.cfg.dtype, device)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else nullcontext
        if self.cfg.kl_coef > 0:  # the frozen reference the KL term pulls towards
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.engine = TorchEngine(model, self.tokenizer, compile=self.cfg.compile)  # --compile: rollouts too
        if self.cfg.reward_model:
            from minimind.train.reward import RewardModel

            self.reward_model = RewardModel.load(self.cfg.reward_model, self.tokenizer, device)

    def dataset(self, path: str) -> PromptSet:
        self.data = PromptSet(path, self.tokenizer, self.cfg, self.default_tools())
        if self.data.stats.truncated:
            self.say(f"{path}: {self.data.stats.truncated:,} prompts are longer than seq_len {self.cfg.seq_len}; "
                     "left out")
        return self.data

    def default_tools(self) -> list[dict] | None:
        return None

    def collate(self, rows: list[int]) -> Batch:
        prompts = [self.data.prompts[i] for i in rows]
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for k, p in enumerate(prompts):
            ids[k, width - len(p):] = torch.tensor(p)
        return {"input_ids": ids, "row": torch.tensor(rows, dtype=torch.long)}

    def prepare(self, model: torch.nn.Module, micro: list[Batch]) -> list[Batch]:
        if self.reuse_left > 0:  # another optimizer step on the same rollouts (update_epochs > 1)
            self.reuse_left -= 1
            return self.cached
        was_training = model.training
        model.eval()
        self.engine.sync(model)
        self.step += 1
        try:
            with torch.no_grad(), self.autocast():
                out = [self.rollout_batch(model, b, m) for m, b in enumerate(micro)]
        finally:
            model.train(was_training)
        if self.cfg.update_epochs > 1:
            self.cached, self.reuse_left = out, self.cfg.update_epochs - 1
        if self.step == 1 or self.step % max(self.cfg.log_every, 1) == 0:
            parts = {k[7:]: float(torch.cat([b[k] for b in out]).mean()) for k in out[0] if k.startswith("reward_")}
            self.say(f"rollouts {self.step}: reward {float(torch.cat([b['reward'] for b in out]).mean()):.3f} ("
                     + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) + ") | reply "
                     f"{float(torch.cat([b['resp_len'] for b in out]).float().mean()):.0f} tokens")
        return out

    def state(self) -> dict[str, Any]:
        """What decides the next rollouts besides the weights and the data position: the rollout counter (it
        seeds the sampler) and, between the optimizer steps of one update_epochs round, the rollouts those
        steps reuse. On the CPU, as tensors and ints: the checkpoint is read with weights_only."""
        cached = [{k: v.cpu() for k, v in b.items()} for b in self.cached] if self.reuse_left else []
        return {"rollouts": self.step, "reuse_left": self.reuse_left, "cached": cached,
                "world": self.dist.world}

    def load_state(self, state: dict[str, Any]) -> None:
        self.step = state["rollouts"]
        if state["reuse_left"] and state["world"] != self.dist.world:
            # Each process cached its own share of the rows; another layout cannot reuse them.
            self.say(f"the checkpoint's rollouts were cached by {state['world']} process(es), not {self.dist.world}:"
                     " drawing fresh ones")
            return
        self.reuse_left = state["reuse_left"]
        self.cached = [{k: v.to(self.device) for k, v in b.items()} for b in state["cached"]]

    def count(self, batch: Batch) -> int:
        mask = batch["labels"][:, 1:] != -100
        return int(mask.sum()) if self.cfg.loss_agg == "token" else int((mask.sum(1) > 0).sum())

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        ids, labels = batch["input_ids"], batch["labels"]
        out = model(ids)
        logp, entropy = logprobs_and_entropy(out.logits, labels)
        mask = labels[:, 1:] != -100
        old = batch["old_logp"][:, 1:] if "old_logp" in batch else logp.detach()
        ref = batch["ref_logp"][:, 1:] if "ref_logp" in batch else logp.detach()
        adv = batch["advantages"][:, None]
        if self.cfg.loss_type == "cispo":
            per_token, clipped = cispo_token_loss(logp, old, ref, adv, self.cfg.kl_coef, self.cfg.epsilon_high)
        else:
            per_token, clipped = grpo_token_loss(logp, old, ref, adv, self.cfg.kl_coef, self.cfg.epsilon)
        total, units = aggregate(per_token, mask, self.cfg.loss_agg)
        extras = self.metrics(batch, logp, ref, entropy, clipped, mask)
        if out.aux_loss is not None:
            extras["aux_loss"] = out.aux_loss
        return total, units, extras

    # -- pieces the PPO and agent stages reuse or replace --

    def metrics(self, batch: Batch, logp, ref, entropy, clipped, mask) -> dict[str, torch.Tensor]:
        m = mask.float()
        n = m.sum().clamp(min=1)
        with torch.no_grad():
            extras = {"reward": batch["reward"].mean(), "kl": (k3_kl(logp, ref) * m).sum() / n,
                      "clip_frac": (clipped.float() * m).sum() / n, "entropy": (entropy * m).sum() / n,
                      "resp_len": batch["resp_len"].float().mean()}
        for key, value in batch.items():
            if key.startswith("reward_"):
                extras[key] = value.mean()
        return extras

    def rollout(self, prompts: list[list[int]], thinking: list[bool], seeds: list[int]) -> list[Rollout]:
        params = SamplingParams(max_new_tokens=self.cfg.max_gen_len, temperature=self.cfg.rollout_temperature,
                                top_p=self.cfg.rollout_top_p)
        return sample(self.engine, prompts, self.group, params, seeds=seeds, thinking=thinking)

    def seeds(self, rows: list[int]) -> list[int]:
        """One sampler seed per reply from (seed, step, row, sample): a reply is the same whichever process
        or micro-batch draws it, so a 2-process run samples exactly what a 1-process run does."""
        return [zlib.crc32(f"{self.cfg.seed}/{self.step}/{r}/{j}".encode()) for r in rows for j in range(self.group)]

    def rollout_batch(self, model: torch.nn.Module, micro: Batch, index: int) -> Batch:
        rows = micro["row"].tolist()
        data = self.data
        rollouts = self.rollout([data.prompts[i] for i in rows], [data.thinking[i] for i in rows], self.seeds(rows))
        samples = [r.sample(data.rows[rows[k // self.group]]) for k, r in enumerate(rollouts)]
        totals, parts = score(samples, self.weights, self.reward_model)
        batch = to_batch(rollouts, model.config.pad_token_id)
        rewards = torch.tensor(totals, dtype=torch.float32)
        batch["reward"] = rewards
        for name, values in parts.items():
            batch[f"reward_{name}"] = torch.tensor(values, dtype=torch.float32)
        batch["resp_len"] = torch.tensor([sum(r.mask) for r in rollouts])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.add_advantages(model, batch, rollouts)
        if self.ref is not None:
            batch["ref_logp"] = sequence_logprobs(self.ref, batch)
        if index == 0:
            self.save_rollouts(rollouts, samples, batch)
        return batch

    def add_advantages(self, model: torch.nn.Module, batch: Batch, rollouts: list[Rollout]) -> None:
        batch["advantages"] = group_advantages(batch["reward"], self.group)
        if self.cfg.update_epochs > 1:  # later steps on these rollouts need the sampling policy's log-probs
            batch["old_logp"] = sequence_logprobs(model, batch)

    def save_rollouts(self, rollouts: list[Rollout], samples: list[Sample], batch: Batch) -> None:
        """Every rollout_every steps, rank 0 appends the first micro-batch's samples to <run>/rollouts.jsonl."""
        every = self.cfg.rollout_every
        if not self.dist.main or not every or (self.step % every and self.step != 1):
            return
        path = Path(self.cfg.run_dir) / "rollouts.jsonl"
        if self.step == 1 and not self.cfg.resume:
            path.unlink(missing_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for k, (r, s) in enumerate(zip(rollouts, samples)):
                record = {"step": self.step, "prompt": self.tokenizer.decode(r.prompt), "turns": r.turns,
                          "tool_calls": [vars(c) for c in r.tool_calls], "finished": r.finished,
                          "expected": s.row.get("answer") if s.row.get("gt") is None else s.row["gt"],
                          "reward": round(float(batch["reward"][k]), 4),
                          "advantage": round(float(batch["advantages"][k].mean()), 4),
                          **{key[7:]: round(float(v[k]), 4) for key, v in batch.items() if key.startswith("reward_")}}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
