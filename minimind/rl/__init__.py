"""Reinforcement learning pieces shared by the PPO, GRPO and agent stages: the rollout engine and the rewards.
The stages themselves are minimind/train/{grpo,ppo,agent}.py: `minimind train grpo --config configs/grpo.toml`."""

from minimind.rl.rewards import REWARDS, Sample, parse_weights, score
from minimind.rl.rollout import Rollout, RolloutEngine, TorchEngine, sample, sample_with_tools, to_batch

__all__ = ["REWARDS", "Rollout", "RolloutEngine", "Sample", "TorchEngine", "parse_weights", "sample",
           "sample_with_tools", "score", "to_batch"]
