"""PPO on the one training loop: one reply per prompt, a value head (critic) on the policy's last hidden state,
GAE advantages, clipped policy and value losses and a k3 KL penalty to the frozen reference.
`minimind train ppo --config configs/ppo.toml`."""

from __future__ import annotations

import torch
from torch import nn

from minimind.checkpoint import save_model
from minimind.logprobs import token_logprobs
from minimind.rl.rollout import Rollout
from minimind.train.grpo import GRPOStage, aggregate, k3_kl, logprobs_and_entropy
from minimind.train.stage import Batch


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [N, L] tensors; positions where mask is 0 (prompt, tool
    responses, padding) are not steps of the trajectory and are skipped. Returns (advantages, returns), 0
    outside the mask. delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, V after the
    last step = 0."""
    adv = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        on = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        now = delta + gamma * lam * running
        adv[:, t] = torch.where(on, now, 0.0)
        running = torch.where(on, now, running)
        next_value = torch.where(on, values[:, t], next_value)
    returns = torch.where(mask > 0, adv + values, 0.0)
    return adv, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked positions (0 elsewhere)."""
    m = mask.float()
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * m


def ppo_token_losses(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                     values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, epsilon: float,
                     cliprange_value: float, beta: float,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (policy loss, value loss, clipped?):
    policy = -min(r A, clip(r, 1-eps, 1+eps) A) + beta k3(ref, logp), r = exp(logp - old_logp);
    value = 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)."""
    ratio = torch.exp(logp - old_logp)
    plain, clipped = ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages
    policy = -torch.minimum(plain, clipped) + beta * k3_kl(logp, ref_logp)
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    value = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return policy, value, clipped < plain


class PPOStage(GRPOStage):
    """Actor and critic share the trunk: the value head reads the final hidden state, captured by a hook on
    the final norm so the forward still goes through the (DDP-wrapped) model and its gradients are averaged.
    (MiniMind's critic is a second full model; one trunk halves the memory and the forward passes.)"""

    name = "ppo"

    def samples_per_prompt(self) -> int:
        return 1

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        super().setup(model, device)  # the reference is copied before the head exists
        # On the trunk (model.model), so its checkpoint names carry the trunk's `model.` prefix and a resume
        # state loads back by name like every other weight.
        model.model.value_head = nn.Linear(model.config.hidden_size, 1).to(device)
        nn.init.zeros_(model.model.value_head.weight)
        nn.init.zeros_(model.model.value_head.bias)
        self.hidden: torch.Tensor | None = None
        model.model.norm.register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module, inputs, output) -> None:
        self.hidden = output

    def values(self, model: torch.nn.Module) -> torch.Tensor:
        """V of the state before each token, [N, T] aligned with the tokens (from the last forward)."""
        head = (model.module if hasattr(model, "module") else model).model.value_head
        v = head(self.hidden[:, :-1]).squeeze(-1).float()
        return torch.nn.functional.pad(v, (1, 0))

    def add_advantages(self, model: torch.nn.Module, batch: Batch, rollouts: list[Rollout]) -> None:
        ids, labels = batch["input_ids"], batch["labels"]
        mask = labels != -100
        logp = torch.zeros(ids.shape, device=ids.device)
        logp[:, 1:] = token_logprobs(model(ids).logits, labels)
        values = self.values(model) * mask
        # The sequence reward arrives on the last trained token; every other step earns 0.
        last = mask.long().cumsum(1).argmax(1)
        rewards = torch.zeros_like(values)
        rewards[torch.arange(len(ids)), last] = batch["reward"]
        adv, returns = gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
        batch.update(old_logp=logp * mask, old_values=values, returns=returns, advantages=whiten(adv, mask))

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        ids, labels = batch["input_ids"], batch["labels"]
        out = model(ids)
        logp, entropy = logprobs_and_entropy(out.logits, labels)
        values = self.values(model)[:, 1:]
        mask = labels[:, 1:] != -100
        ref = batch["ref_logp"][:, 1:] if "ref_logp" in batch else logp.detach()
        policy, value, clipped = ppo_token_losses(
            logp, batch["old_logp"][:, 1:], ref, batch["advantages"][:, 1:], values, batch["old_values"][:, 1:],
            batch["returns"][:, 1:], self.cfg.epsilon, self.cfg.cliprange_value, self.cfg.kl_coef)
        total, units = aggregate(policy + self.cfg.vf_coef * value, mask, self.cfg.loss_agg)
        extras = self.metrics(batch, logp, ref, entropy, clipped, mask)
        with torch.no_grad():
            m = mask.float()
            extras["value_loss"] = (value * m).sum() / m.sum().clamp(min=1)
        if out.aux_loss is not None:
            extras["aux_loss"] = out.aux_loss
        return total, units, extras

    def save(self, model: torch.nn.Module, out, tokenizer) -> None:
        """A plain model directory: the value head is training machinery, not part of the model."""
        head = model.model.value_head
        del model.model.value_head
        try:
            save_model(model, out, tokenizer)
        finally:
            model.model.value_head = head
