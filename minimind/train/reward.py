"""Reward model on the one training loop: the policy trunk plus a scalar head on the last token's hidden state,
trained on preference pairs (DPO rows) with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).
`minimind train reward --config F.toml --data dpo.jsonl`; RL stages score with it via `reward_model = DIR`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from minimind import MiniMindError
from minimind.chat import encode_chat
from minimind.checkpoint import load_model, save_model
from minimind.data.formats import iter_rows
from minimind.rl.rewards import Sample
from minimind.train.config import TrainConfig
from minimind.train.stage import Stage

HEAD = "reward_head.safetensors"  # beside model.safetensors; the directory still loads as a causal LM


class LastHidden:
    """Keeps the final-norm output of each forward, so the head reads it while the forward itself goes
    through the (possibly DDP-wrapped) model."""

    def __init__(self, model: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        model.model.norm.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.value = output

    def at(self, last: torch.Tensor) -> torch.Tensor:
        return self.value[torch.arange(len(last), device=last.device), last]


def pad_right(seqs: Sequence[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T] right-padded ids and each row's last real position."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) - 1 for s in seqs])


@dataclass
class PairStats:
    tokens: int = 0
    truncated: int = 0  # pairs with a side longer than seq_len, cut to its last seq_len tokens
    skipped_bad: int = 0


class PairSet:
    def __init__(self, path: str, tokenizer, cfg: TrainConfig) -> None:
        bad: list | None = [] if cfg.skip_bad else None
        self.pairs: list[tuple[list[int], list[int]]] = []
        self.stats = PairStats()
        for _, row in iter_rows(path, "dpo", bad):
            sides = []
            for side in ("chosen", "rejected"):
                ids, _ = encode_chat(tokenizer, row[side], tools=row["tools"])
                if len(ids) > cfg.seq_len:
                    ids = ids[-cfg.seq_len:]  # keep the end: the replies being compared
                    self.stats.truncated += 1
                sides.append(ids)
                self.stats.tokens += len(ids)
            self.pairs.append((sides[0], sides[1]))
        self.stats.skipped_bad = len(bad or [])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.pairs[i]


class RewardStage(Stage):
    """Bradley-Terry on preference pairs; the unit is a pair. Logs pair accuracy and the mean margin."""

    name = "reward"

    def setup(self, model: nn.Module, device: torch.device) -> None:
        # On the trunk (model.model), so its checkpoint names carry the trunk's `model.` prefix and a resume
        # state loads back by name like every other weight.
        model.model.reward_head = nn.Linear(model.config.hidden_size, 1).to(device)
        nn.init.zeros_(model.model.reward_head.weight)
        nn.init.zeros_(model.model.reward_head.bias)
        self.hidden = LastHidden(model)

    def dataset(self, path: str) -> PairSet:
        return PairSet(path, self.tokenizer, self.cfg)

    def collate(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        ids, last = pad_right([c for c, _ in rows] + [r for _, r in rows])
        return {"input_ids": ids, "last": last}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["input_ids"]) // 2

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        model(batch["input_ids"])
        head = (model.module if hasattr(model, "module") else model).model.reward_head
        scores = head(self.hidden.at(batch["last"])).squeeze(-1).float()
        chosen, rejected = scores.chunk(2)
        margin = chosen - rejected
        with torch.no_grad():
            extras = {"pair_accuracy": (margin > 0).float().mean(), "margin": margin.mean()}
        return -F.logsigmoid(margin).sum(), len(margin), extras

    def save(self, model: nn.Module, out, tokenizer) -> None:
        head = model.model.reward_head
        del model.model.reward_head
        try:
            save_model(model, out, tokenizer)
        finally:
            model.model.reward_head = head
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, Path(out) / HEAD)


class RewardModel:
    """A trained reward-model directory as a scorer for the RL stages: prompt + reply -> one number."""

    def __init__(self, model: nn.Module, head: nn.Linear, tokenizer, max_len: int = 1024) -> None:
        self.model, self.head, self.tokenizer, self.max_len = model.eval(), head.eval(), tokenizer, max_len
        self.hidden = LastHidden(model)

    @classmethod
    def load(cls, directory: str | Path, tokenizer, device: torch.device | str = "cpu") -> RewardModel:
        directory = Path(directory)
        if not (directory / HEAD).is_file():
            raise MiniMindError(f"{directory}: no {HEAD}; train one with `minimind train reward`")
        model = load_model(directory, device).requires_grad_(False)
        head = nn.Linear(model.config.hidden_size, 1).to(device)
        head.load_state_dict(load_file(directory / HEAD))
        return cls(model, head.requires_grad_(False), tokenizer)

    @torch.no_grad()
    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        seqs = []
        for s in samples:
            messages = [*s.row["messages"], {"role": "assistant", "content": s.text}]
            seqs.append(encode_chat(self.tokenizer, messages, tools=s.row.get("tools"))[0][-self.max_len:])
        ids, last = pad_right(seqs)
        device = self.head.weight.device
        self.model(ids.to(device))
        return self.head(self.hidden.at(last.to(device))).squeeze(-1).float().tolist()
