"""Accuracy on generated tasks with known answers (the built-in held-out probes): batched greedy generation,
then the final answer is extracted and compared. `probe_accuracy(model, tok, rows, enable_thinking=True)`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from minimind.chat import chat_format, encode_chat
from minimind.data.tasks import REASONING_FAMILIES, is_correct, prompt_row
from minimind.generation import Completion, SamplingParams, generate
from minimind.model import MiniMindForCausalLM
from minimind.rl.rewards import answer_reward, tool_correct
from minimind.rl.rollout import TorchEngine, sample_with_tools


@dataclass
class ProbeResult:
    correct: int = 0
    total: int = 0
    by_family: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    samples: list[dict] = field(default_factory=list)  # question, generated text, expected, correct
    thought: int = 0  # answers generated with thinking on
    well_formed: int = 0  # of those: one closed think block, then a non-empty answer, then the end token

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    @property
    def format_rate(self) -> float:
        return self.well_formed / max(self.thought, 1)

    def family_accuracy(self) -> dict[str, float]:
        return {k: c / max(n, 1) for k, (c, n) in sorted(self.by_family.items())}


def is_well_formed(generated: str, finish_reason: str | None) -> bool:
    """A thinking answer as taught: reasoning, one `</think>`, a non-empty answer, and a proper stop (the
    prompt already opened the think block)."""
    parts = generated.split("</think>")
    return len(parts) == 2 and "<think>" not in generated and bool(parts[1].strip()) and finish_reason == "stop"


def thinks(row: dict) -> bool:
    """Whether a task is answered thinking: its family's training replies carry worked steps, or its own
    reference reply does."""
    return row.get("task") in REASONING_FAMILIES or bool(row["conversations"][-1].get("reasoning_content"))


def answer_tasks(model: MiniMindForCausalLM, tokenizer, rows: Sequence[dict], enable_thinking: bool | None = None,
                 max_new_tokens: int = 128, batch_size: int = 32,
                 progress: bool = False) -> Iterator[tuple[dict, bool, Completion]]:
    """(row, thought, completion) for each task row in order: the model's greedy reply to the row's prompt (its
    conversation up to the last user turn). enable_thinking=None thinks as the model was taught (see thinks);
    a thinking reply's text starts after the opened think block. `progress` shows a bar."""
    from tqdm import tqdm

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    fmt = chat_format(tokenizer)
    bar = tqdm(total=len(rows), desc="probes", unit=" tasks", disable=not progress, leave=False)
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo:lo + batch_size]
        prompts, thinking = [], []
        for row in chunk:
            prompt = prompt_row(row)
            # A minimind2-era tokenizer has no think tokens: such a model was taught no thinking.
            think = thinks(row) and fmt == "minimind-3" if enable_thinking is None else enable_thinking
            ids, _ = encode_chat(tokenizer, prompt["conversations"], tools=prompt.get("tools"),
                                 add_generation_prompt=True, enable_thinking=think)
            prompts.append(ids)
            thinking.append(think)
        yield from zip(chunk, thinking, generate(model, tokenizer, prompts, params))
        bar.update(len(chunk))
    bar.close()


def probe_accuracy(model: MiniMindForCausalLM, tokenizer, rows: Sequence[dict], enable_thinking: bool | None = None,
                   max_new_tokens: int = 128, batch_size: int = 32, progress: bool = False) -> ProbeResult:
    """Greedy answers to each task (see answer_tasks), the final answer extracted and compared."""
    result = ProbeResult()
    for row, think, out in answer_tasks(model, tokenizer, rows, enable_thinking, max_new_tokens, batch_size,
                                        progress):
        ok = is_correct(row, ("<think>\n" if think else "") + out.text)
        family = row.get("task", "task")
        result.correct += ok
        result.total += 1
        result.by_family[family][0] += ok
        result.by_family[family][1] += 1
        if think:
            result.thought += 1
            result.well_formed += is_well_formed(out.text, out.finish_reason)
        if len(result.samples) < 200:
            question = next(m["content"] for m in reversed(prompt_row(row)["conversations"]) if m["role"] == "user")
            result.samples.append({"family": family, "question": question, "output": out.text,
                                   "expected": row.get("answer"), "correct": ok})
    return result


def tool_use(model, tokenizer, rows: Sequence[dict], max_new_tokens: int = 64, max_turns: int = 3) -> dict:
    """Greedy multi-turn tool use on task rows: the share of replies with the right final answer, of
    trajectories whose tool call returned the right answer (correct calculator use), and of any valid call."""
    prompts = []
    for row in rows:
        p = prompt_row(row)
        system = p["conversations"][0]
        prompts.append(encode_chat(tokenizer, p["conversations"], tools=system.get("tools"),
                                   add_generation_prompt=True)[0])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    engine = TorchEngine(model, tokenizer)
    results = []
    for lo in range(0, len(prompts), 32):
        results += sample_with_tools(engine, tokenizer, prompts[lo:lo + 32], 1, params, max_turns=max_turns,
                                     max_total_len=model.config.max_position_embeddings)
    samples = [r.sample(row) for r, row in zip(results, rows)]
    n = max(len(rows), 1)
    return {"answer_accuracy": sum(answer_reward(s) for s in samples) / n,
            "correct_tool_use": sum(tool_correct(s) for s in samples) / n,
            "valid_call_rate": sum(any(c.valid for c in s.tool_calls) for s in samples) / n, "n": len(rows)}
