"""More preference pairs: a concise reply preferred over a repetitive one (`make_repetition_pairs(tasks, seed=0)`,
task rows from data.tasks), and a reference reply preferred over the model's own wrong one
(`mistake_pairs(model, tokenizer, dpo_rows)`)."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence

from minimind.chat import parse_assistant
from minimind.data.tasks import _NUMBER_RE, TOOL_FAMILIES, extract_answer, is_correct
from minimind.eval.probes import answer_tasks

_CJK = re.compile(r"[\u4e00-\u9fff]")


def _repeat(text: str, times: int) -> str:
    """`text` said `times` times in a row (no space between Chinese sentences, one between English ones)."""
    sep = "" if _CJK.search(text) else " "
    return sep.join([text.strip()] * times)


def make_repetition_pairs(tasks: Sequence[dict], seed: int) -> list[dict]:
    """One DPO row per task row: chosen is the task's reply; rejected says the same final answer two to four
    times over and, for half of the replies with worked steps, repeats the last working line too. Both sides
    are correct, so the preference is about style: a model that learns it stops looping, a common failure of
    small models."""
    rng = random.Random(f"minimind-dpo-repetition/{seed}")
    pairs = []
    for task in tasks:
        chosen = task["conversations"]
        final = chosen[-1]
        reply = {**final, "content": _repeat(final["content"], rng.randint(2, 4))}
        reasoning = final.get("reasoning_content")
        if reasoning and rng.random() < 0.5:
            last = reasoning.strip().splitlines()[-1]
            reply["reasoning_content"] = reasoning.rstrip("\n") + "\n" + "\n".join([last] * rng.randint(1, 3))
        # The tool-call turns of a calculator task belong to the reply: keep them, repeat only the answer.
        rejected = [*chosen[:-1], reply]
        pairs.append({"chosen": chosen, "rejected": rejected, "task": task["task"], "kind": "repetition"})
    return pairs


def mistake_pairs(model, tokenizer, pairs: Sequence[dict], batch_size: int = 32) -> list[dict]:
    """On-policy DPO rows: the model answers the prompt of each DPO row whose chosen reply ends in a number
    (greedy, thinking as taught; tool tasks left out), and every wrong answer becomes a pair of that chosen
    reply over the model's own reply (`kind` "own mistake"). Synthetic wrong answers are ones the model may never
    give; its own mistakes are the ones preference tuning has to move it away from."""
    tasks, seen = [], set()
    for pair in pairs:
        chosen = pair["chosen"]
        answer = extract_answer(chosen[-1]["content"]) if chosen[-1].get("role") == "assistant" else None
        prompt = json.dumps(chosen[:-1], ensure_ascii=False, sort_keys=True)
        tools = pair.get("task") in TOOL_FAMILIES or pair.get("tools") or any(
            m.get("tools") or m.get("tool_calls") or m.get("role") == "tool" for m in chosen)
        if tools or not answer or not _NUMBER_RE.fullmatch(answer) or prompt in seen:
            continue
        seen.add(prompt)
        tasks.append({"conversations": chosen, "answer": answer, "task": pair.get("task", "task")})
    out = []
    for task, think, completion in answer_tasks(model, tokenizer, tasks, batch_size=batch_size):
        text = ("<think>\n" if think else "") + completion.text
        reply = parse_assistant(text)
        if is_correct(task, text) or not reply["content"]:
            continue
        rejected = {"role": "assistant", "content": reply["content"]}
        if reply["reasoning_content"]:
            rejected["reasoning_content"] = reply["reasoning_content"]
        out.append({"chosen": task["conversations"], "rejected": [*task["conversations"][:-1], rejected],
                    "task": task["task"], "kind": "own mistake"})
    return out
