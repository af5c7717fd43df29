"""Preference accuracy on held-out DPO pairs: how often the model scores the chosen reply above the rejected
one. `acc, margin = preference_accuracy(model, tok, pairs)` (pairs: DPO rows, or a .jsonl path); and pairs made
of the model's own wrong answers, `mistake_pairs(model, tok, dpo_rows)`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from minimind import MiniMindError
from minimind.chat import parse_assistant
from minimind.data.formats import iter_rows, parse_row
from minimind.data.preferences import collate_pairs, encode_side
from minimind.data.tasks import NUMBER_RE, TOOL_FAMILIES, extract_answer, is_correct
from minimind.eval.probes import answer_tasks
from minimind.logprobs import response_logps
from minimind.model import MiniMindForCausalLM


@torch.no_grad()
def pair_margins(model: MiniMindForCausalLM, tokenizer, pairs: Sequence[dict] | str | Path,
                 ref_model: MiniMindForCausalLM | None = None, batch_size: int = 16,
                 seq_len: int | None = None, per_token: bool = False) -> list[float]:
    """Per pair: log p(chosen) - log p(rejected), summed over the response tokens; with `ref_model`, the
    DPO implicit reward margin (the same difference taken relative to the reference), in nats. per_token
    averages each side over its response tokens first, so a shorter reply is not favoured for its length."""
    if isinstance(pairs, (str, Path)):
        rows = [row for _, row in iter_rows(pairs, "dpo")]
    else:
        rows = []
        for i, row in enumerate(pairs):
            try:
                rows.append(parse_row(row, "dpo"))
            except ValueError as e:
                raise MiniMindError(f"pair {i}: {e}") from None
    seq_len = seq_len or model.config.max_position_embeddings
    encoded = []
    for row in rows:
        sides = [encode_side(tokenizer, row[s], row["tools"]) for s in ("chosen", "rejected")]
        encoded.append(tuple(x[:seq_len] for side in sides for x in side))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    margins: list[float] = []
    for lo in range(0, len(encoded), batch_size):
        batch = collate_pairs(encoded[lo:lo + batch_size], tokenizer.pad_token_id or 0)
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        logp = response_logps(model(ids).logits, labels)
        if ref_model is not None:
            logp = logp - response_logps(ref_model(ids).logits, labels)
        if per_token:
            logp = logp / (labels[:, 1:] != -100).sum(-1).clamp(min=1)
        n = ids.shape[0] // 2
        margins += (logp[:n] - logp[n:]).tolist()
    model.train(was_training)
    return margins


def preference_accuracy(model: MiniMindForCausalLM, tokenizer, pairs: Sequence[dict] | str | Path,
                        ref_model: MiniMindForCausalLM | None = None, batch_size: int = 16,
                        seq_len: int | None = None, per_token: bool = True) -> tuple[float, float]:
    """(share of pairs whose margin favours chosen (a tie does not), mean margin in nats); see pair_margins.
    Per token by default: the built-in pairs differ in length (a repetitive or a terse rejected reply), and a
    summed log-prob would prefer the shorter side whatever the model has learnt."""
    margins = pair_margins(model, tokenizer, pairs, ref_model, batch_size, seq_len, per_token)
    if not margins:
        raise MiniMindError("preference_accuracy: no pairs to score")
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


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
        if tools or not answer or not NUMBER_RE.fullmatch(answer) or prompt in seen:
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
