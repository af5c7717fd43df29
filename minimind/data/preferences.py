"""More built-in preference pairs from the generated tasks: a concise reply preferred over a repetitive one.
`pairs = make_repetition_pairs(tasks, seed=0)` (task rows from data.tasks.make_tasks / heldout_split)."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

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
