"""The rollout engine: several samples per prompt from the current policy (batched, KV-cached, through
minimind.generation), per-token log-probs, and multi-turn tool-use trajectories whose tool tokens carry no loss.
`rollouts = sample(TorchEngine(model, tok), prompts, n=4, params=SamplingParams(max_new_tokens=64))`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from minimind.chat import CALL_OPEN, THINK_OPEN, encode_chat, parse_assistant
from minimind.generation import Completion, SamplingParams, generate
from minimind.logprobs import token_logprobs
from minimind.rl.rewards import Sample
from minimind.tools import ToolCall, ToolLoop, run_tool


class RolloutEngine(Protocol):
    """What the RL stages need from a sampler: a batch of prompts (token ids) in, one Completion each out
    (token ids without the end token, text, finish_reason "stop" or "length"). A faster backend (a server
    with its own KV cache) replaces TorchEngine by supplying this method and `sync`."""

    eos_id: int

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]: ...
    def sync(self, model: torch.nn.Module) -> None: ...


class TorchEngine:
    """Samples from the live model in this process with minimind.generation (THE sampler and KV cache)."""

    def __init__(self, model: torch.nn.Module, tokenizer, compile: bool | None = None) -> None:
        self.model, self.tokenizer, self.compile = model, tokenizer, compile  # compile: see generation.decode
        self.eos_id = model.config.eos_token_id

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        return generate(self.model, self.tokenizer, prompts, params, compile=self.compile)

    def sync(self, model: torch.nn.Module) -> None:
        self.model = model  # same process, same weights: nothing to copy


@dataclass
class Rollout:
    """One sampled reply (or tool-use trajectory) to one prompt."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)  # everything after the prompt, each turn's <|im_end|> included
    mask: list[int] = field(default_factory=list)  # 1: sampled by the policy (trained on); 0: tool response tokens
    turns: list[str] = field(default_factory=list)  # each assistant turn's text ("<think>\n" first when opened)
    tool_calls: list[ToolCall] = field(default_factory=list)
    bad_calls: int = 0  # <tool_call> blocks that were not a JSON object with a name
    finished: bool = False  # the last turn ended with <|im_end|> and called no tool
    thinking: bool = False  # the prompt opened <think>
    logprobs: list[float] | None = None  # per token of `tokens` under the policy (0 where mask is 0)

    @property
    def text(self) -> str:
        """The final assistant turn: what answer rewards read."""
        return self.turns[-1] if self.turns else ""

    def sample(self, row: dict) -> Sample:
        return Sample(text=self.text, row=row, thinking=self.thinking, turns=list(self.turns),
                      tool_calls=list(self.tool_calls), bad_calls=self.bad_calls, finished=self.finished)


def _seeded(params: SamplingParams, seeds: Sequence[int | None] | None, count: int, offset: int = 0,
            ) -> list[SamplingParams]:
    if seeds is None:
        return [params] * count
    return [replace(params, seed=None if s is None else s + offset) for s in seeds]


def sample(engine: RolloutEngine, prompts: Sequence[list[int]], n: int, params: SamplingParams,
           seeds: Sequence[int | None] | None = None, thinking: Sequence[bool] | None = None) -> list[Rollout]:
    """`n` single-turn samples per prompt, all in one batch; returned prompt-major (prompt i, sample j at
    i * n + j). `seeds` (one per sample) makes each sample reproducible whatever batch it is drawn in."""
    flat = [list(p) for p in prompts for _ in range(n)]
    outs = engine.generate(flat, _seeded(params, seeds, len(flat)))
    rollouts = []
    for k, (prompt, out) in enumerate(zip(flat, outs)):
        think = bool(thinking[k // n]) if thinking is not None else False
        r = Rollout(prompt=prompt, thinking=think)
        _add_turn(r, out, engine.eos_id)
        r.finished = out.finish_reason == "stop"
        rollouts.append(r)
    return rollouts


def _add_turn(r: Rollout, out: Completion, eos_id: int) -> dict:
    tokens = list(out.token_ids) + ([eos_id] if out.finish_reason == "stop" else [])
    r.tokens += tokens
    r.mask += [1] * len(tokens)
    text = (THINK_OPEN + "\n" if r.thinking else "") + out.text
    r.turns.append(text)
    reply = parse_assistant(text)
    r.bad_calls += text.count(CALL_OPEN) - len(reply["tool_calls"])
    return reply


def sample_with_tools(engine: RolloutEngine, tokenizer, prompts: Sequence[list[int]], n: int,
                      params: SamplingParams, seeds: Sequence[int | None] | None = None,
                      thinking: Sequence[bool] | None = None, max_turns: int = 3, max_total_len: int = 2500,
                      run: Callable[[str, str], str] = run_tool) -> list[Rollout]:
    """Multi-turn tool use, each trajectory on its own ToolLoop (minimind.tools: `run`, default run_tool, is our
    own parsers with bounded output, never eval): generate; if the turn calls tools, append the <tool_response>
    turn and let the model continue; stop at a turn without calls, at `max_turns` turns or at `max_total_len`
    tokens. Tool tokens get mask 0: the policy did not choose them."""
    rollouts = [Rollout(prompt=list(p), thinking=bool(thinking[i]) if thinking is not None else False)
                for i, p in enumerate(prompts) for _ in range(n)]
    loops = [ToolLoop(max_turns - 1, run) for _ in rollouts]  # the last turn's calls would get no answer
    base = _seeded(params, seeds, len(rollouts))
    active = list(range(len(rollouts)))
    for turn in range(max_turns):
        room = {i: max_total_len - len(rollouts[i].prompt) - len(rollouts[i].tokens) for i in active}
        active = [i for i in active if room[i] > 1]
        if not active:
            break
        # Each turn its own seed stream, so a retried turn does not replay the first one's choices.
        turn_params = [replace(base[i], max_new_tokens=min(base[i].max_new_tokens, room[i] - 1),
                               seed=None if base[i].seed is None else base[i].seed + 7919 * turn) for i in active]
        outs = engine.generate([rollouts[i].prompt + rollouts[i].tokens for i in active], turn_params)
        still = []
        for i, out in zip(active, outs):
            r = rollouts[i]
            reply = _add_turn(r, out, engine.eos_id)
            if out.finish_reason != "stop":
                continue  # cut off: unfinished
            results = loops[i].step(reply)
            r.tool_calls = loops[i].calls
            r.finished = loops[i].finished
            if results is None:
                continue  # no calls (finished), or still calling tools at the turn limit (unfinished)
            # The template's own rendering of the tool turn, then the next assistant header ("\n" closes the
            # assistant line the model ended with <|im_end|>). encode_chat: a special token that a tool's
            # answer echoes from the model's arguments stays text.
            ids = tokenizer("\n", add_special_tokens=False)["input_ids"] + encode_chat(
                tokenizer, results, add_generation_prompt=True, enable_thinking=r.thinking)[0]
            if len(r.prompt) + len(r.tokens) + len(ids) + 1 >= max_total_len:
                continue
            r.tokens += ids
            r.mask += [0] * len(ids)
            still.append(i)
        active = still
    return rollouts


# ---- tensors -----------------------------------------------------------------------------------------


def to_batch(rollouts: Sequence[Rollout], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Prompt + tokens of each rollout, right-padded (padding after the text needs no attention mask under a
    causal model): input_ids [N, T], and labels [N, T] equal to input_ids where the policy sampled the
    token and -100 elsewhere (prompt, tool responses, padding)."""
    width = max(len(r.prompt) + len(r.tokens) for r in rollouts)
    ids = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rollouts), width), -100, dtype=torch.long)
    for i, r in enumerate(rollouts):
        seq = torch.tensor(r.prompt + r.tokens, dtype=torch.long)
        ids[i, :len(seq)] = seq
        trained = torch.tensor([0] * len(r.prompt) + r.mask, dtype=torch.bool)
        labels[i, :len(seq)] = torch.where(trained, seq, -100)
    return {"input_ids": ids, "labels": labels}


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 16) -> torch.Tensor:
    """Per-token log-probs [N, T] of a to_batch() batch under `model` by forward passes (position t holds
    log p(input_ids[t]); position 0 and untrained positions are 0)."""
    ids, labels = batch["input_ids"], batch["labels"]
    out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    for lo in range(0, len(ids), chunk):
        out[lo:lo + chunk, 1:] = token_logprobs(model(ids[lo:lo + chunk]).logits, labels[lo:lo + chunk])
    return out


def attach_logprobs(model: torch.nn.Module, rollouts: Sequence[Rollout], device: torch.device | str = "cpu",
                    ) -> None:
    """Fill each rollout's `logprobs` (per token of `tokens`) by one forward pass over prompt + tokens."""
    batch = {k: v.to(device) for k, v in to_batch(rollouts).items()}
    logp = sequence_logprobs(model, batch).cpu()
    for i, r in enumerate(rollouts):
        r.logprobs = logp[i, len(r.prompt):len(r.prompt) + len(r.tokens)].tolist()
