"""Preference accuracy on held-out DPO pairs: how often the model scores the chosen reply above the rejected
one. `acc, margin = preference_accuracy(model, tok, pairs)` (pairs: DPO rows, or a .jsonl path)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from minimind import MiniMindError
from minimind.data.formats import iter_rows, parse_row
from minimind.model import MiniMindForCausalLM
from minimind.train.dpo import collate_pairs, encode_side, response_logps


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
