"""Agentic RL on the one training loop: GRPO / CISPO over multi-turn tool-use trajectories (generate, run the
called tools in the sandbox, feed back <tool_response>, continue), tool tokens carrying no loss.
`minimind train agent --config configs/agent.toml`."""

from __future__ import annotations

from minimind import MiniMindError
from minimind.generation import SamplingParams
from minimind.rl.rollout import Rollout, sample_with_tools
from minimind.tools import tool_schemas
from minimind.train.grpo import GRPOStage
from minimind.train.stage import Dist


class AgentStage(GRPOStage):
    """Rows: MiniMind's agent_rl format (tools on the system message, `gt` answers) or the built-in
    calculator tasks (`answer`). Rows that offer no tools get `tools` from the config (default: all of
    minimind.tools). Rewards as configured; `tool_correct` (a tool call returned the right answer) is always
    logged."""

    name = "agent"

    def __init__(self, cfg, tokenizer, dist: Dist | None = None) -> None:
        super().__init__(cfg, tokenizer, dist)
        if cfg.max_turns < 1:
            raise MiniMindError("max_turns must be at least 1")
        self.weights.setdefault("tool_correct", 0.0)  # logged, not rewarded unless weighted

    def default_tools(self) -> list[dict] | None:
        try:
            return tool_schemas(self.cfg.tools or None)
        except ValueError as e:
            raise MiniMindError(f"tools: {e}") from None

    def rollout(self, prompts: list[list[int]], thinking: list[bool], seeds: list[int]) -> list[Rollout]:
        params = SamplingParams(max_new_tokens=self.cfg.max_gen_len, temperature=self.cfg.rollout_temperature,
                                top_p=self.cfg.rollout_top_p)
        return sample_with_tools(self.engine, self.tokenizer, prompts, self.group, params, seeds=seeds,
                                 thinking=thinking, max_turns=self.cfg.max_turns,
                                 max_total_len=self.cfg.max_total_len)
