"""The distillation recipe's measure: how close white-box distillation has brought a student to its teacher,
as the mean KL per assistant token on held-out SFT rows. `heldout_kl(student, teacher, tok, "sft_val.jsonl")`."""

from __future__ import annotations

from pathlib import Path

import torch

from minimind.chat import encode_chat
from minimind.data.formats import iter_rows
from minimind.train.distill import kd_kl


@torch.no_grad()
def heldout_kl(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer, path: str | Path, seq_len: int = 512,
               rows: int = 64) -> float:
    """Mean KL(teacher || student) per assistant token (T = 1) over the first `rows` conversations of an SFT
    file: how close distillation has brought the student."""
    device = next(student.parameters()).device
    total, count = 0.0, 0
    for i, (_, row) in enumerate(iter_rows(path, "sft")):
        if i == rows:
            break
        ids, mask = encode_chat(tokenizer, row["messages"], row["tools"])
        ids, mask = torch.tensor([ids[:seq_len]], device=device), torch.tensor(mask[:seq_len], device=device)
        keep = mask[1:].bool()
        kl = kd_kl(student(ids).logits[0, :-1][keep], teacher(ids).logits[0, :-1][keep], 1.0)
        total, count = total + float(kl.sum()), count + int(keep.sum())
    return total / max(count, 1)
