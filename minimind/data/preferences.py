"""Preference pairs as data: tokenized (`read_pairs(path, tok, seq_len)`, `encode_side`), batched
(`collate_pairs`), and generated: a concise reply over a repetitive one (`make_repetition_pairs(tasks, seed=0)`)."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import numpy as np
import torch

from minimind.chat import encode_chat
from minimind.data.formats import BadLine, iter_rows
from minimind.data.pack import PackStats

Pair = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # chosen ids, chosen mask, rejected ids, rejected mask


def _response_only(mask: list[int], earlier_turns: int) -> list[int]:
    """The loss mask without its first `earlier_turns` runs of ones: assistant turns that belong to the
    shared prompt (history before the last user turn) are context, not the response being compared."""
    out, run = list(mask), 0
    for i, m in enumerate(mask):
        if m and (i == 0 or not mask[i - 1]):
            run += 1
        if m and run <= earlier_turns:
            out[i] = 0
    return out


def encode_side(tokenizer, messages: list[dict], tools: list[dict] | None,
                newline_loss: bool = False) -> tuple[list[int], list[int]]:
    """One side of a pair as (ids, mask) with loss only on the reply after the last user turn (newline_loss:
    and on the newline after each of its `<|im_end|>`s, as MiniMind's DPO mask)."""
    ids, mask = encode_chat(tokenizer, messages, tools, newline_loss=newline_loss)
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    earlier = sum(m["role"] == "assistant" for m in messages[:last_user])
    return ids, _response_only(mask, earlier)


class PairDataset:
    """Tokenized preference pairs, in memory (DPO files are small). Pairs longer than seq_len have their
    response cut (counted in stats.truncated); a pair with no response token left on a side is dropped."""

    def __init__(self, pairs: list[Pair], stats: PackStats, dropped: int) -> None:
        self.pairs, self.stats, self.dropped = pairs, stats, dropped

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Pair:
        return self.pairs[i]

    def lengths(self) -> np.ndarray:
        """Padded width of each pair (its longer side), for the loop's length-grouped batches."""
        return np.array([max(len(p[0]), len(p[2])) for p in self.pairs], dtype=np.int64)


def read_pairs(path: str, tokenizer, seq_len: int, skip_bad: bool = False, newline_loss: bool = False,
               ) -> PairDataset:
    """Read a DPO file (either layout, via formats.iter_rows) and tokenize both sides of every pair (see
    encode_side for newline_loss)."""
    bad: list[BadLine] | None = [] if skip_bad else None
    stats, pairs, dropped = PackStats(), [], 0
    for _, row in iter_rows(path, "dpo", bad):
        stats.documents += 1
        sides = []
        for side in ("chosen", "rejected"):
            ids, mask = encode_side(tokenizer, row[side], row["tools"], newline_loss)
            stats.longest = max(stats.longest, len(ids))
            sides.append((ids, mask))
        if any(len(ids) > seq_len for ids, _ in sides):
            stats.truncated += 1
            stats.dropped_tokens += sum(max(0, len(ids) - seq_len) for ids, _ in sides)
            sides = [(ids[:seq_len], mask[:seq_len]) for ids, mask in sides]
        if any(sum(mask) == 0 for _, mask in sides):  # the prompt alone fills seq_len: nothing to compare
            dropped += 1
            stats.no_loss_rows += 1
            continue
        stats.rows += 1
        stats.tokens += sum(len(ids) for ids, _ in sides)
        stats.loss_tokens += sum(sum(mask) for _, mask in sides)
        pairs.append(tuple(np.asarray(x, dtype=np.int32 if k % 2 == 0 else np.uint8)
                           for k, x in enumerate((*sides[0], *sides[1]))))
    stats.skipped_bad = len(bad or [])
    return PairDataset(pairs, stats, dropped)


def collate_pairs(rows: list[Pair], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Chosen sides in rows 0..B-1, rejected in B..2B-1, right-padded to the longest (the causal mask alone
    hides the padding); labels are the ids on response tokens, -100 elsewhere."""
    sides = [(r[0], r[1]) for r in rows] + [(r[2], r[3]) for r in rows]
    width = max(len(ids) for ids, _ in sides)
    ids = torch.full((len(sides), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sides), width), -100, dtype=torch.long)
    for i, (row, mask) in enumerate(sides):
        t = torch.from_numpy(np.asarray(row, dtype=np.int64))
        ids[i, :len(t)] = t
        labels[i, :len(t)] = torch.where(torch.from_numpy(np.asarray(mask, dtype=bool)), t, -100)
    return {"input_ids": ids, "labels": labels}


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
