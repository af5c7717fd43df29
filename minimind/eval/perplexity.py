"""Perplexity and bits per byte of a model on raw text. Bits per byte divide the total loss by the UTF-8
size of the text, so models with different tokenizers compare fairly. `bits_per_byte(model, tok, texts)`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from minimind.logprobs import token_logprobs
from minimind.model import MiniMindForCausalLM


@dataclass
class TextScore:
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the scored text
    nats: float  # total negative log-likelihood

    @property
    def loss(self) -> float:
        return self.nats / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / max(self.bytes, 1)


@torch.inference_mode()
def score_texts(model: MiniMindForCausalLM, tokenizer, texts: Iterable[str], seq_len: int = 512,
                batch_size: int = 8, progress: bool = False) -> TextScore:
    """Each text is `<|im_start|>` + its tokens, as in pretraining; every token after the first is scored.
    Texts longer than seq_len are scored in consecutive windows. `progress` shows a bar over the windows."""
    from tqdm import tqdm

    bos = model.config.bos_token_id
    device = model.model.embed_tokens.weight.device
    windows: list[list[int]] = []
    n_bytes = 0
    for text in texts:
        ids = [bos] + tokenizer.encode(text, add_special_tokens=False)
        n_bytes += len(text.encode("utf-8"))
        # Windows overlap by one token so that every token of the text is predicted exactly once.
        for start in range(0, len(ids) - 1, seq_len - 1):
            windows.append(ids[start:start + seq_len])
    tokens, nats = 0, 0.0
    bar = tqdm(total=len(windows), desc="perplexity", unit=" windows", disable=not progress, leave=False)
    for lo in range(0, len(windows), batch_size):
        chunk = windows[lo:lo + batch_size]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, w in enumerate(chunk):
            ids[i, :len(w)] = torch.tensor(w)
            labels[i, :len(w)] = torch.tensor(w)
        nats -= float(token_logprobs(model(ids.to(device)).logits, labels.to(device)).sum())
        tokens += int((labels[:, 1:] != -100).sum())
        bar.update(len(chunk))
    bar.close()
    return TextScore(tokens=tokens, bytes=n_bytes, nats=nats)
