"""Perplexity and bits per byte of a model on raw text. Bits per byte divide the total loss by the UTF-8
size of the text, so models with different tokenizers compare fairly. `bits_per_byte(model, tok, texts)`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from minimind.logprobs import token_nll
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


def windows(n_ids: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """lm-eval's rolling windows over n_ids tokens (`<|im_start|>` + a text): (start, end, scored): the model reads
    ids[start:end] (at most seq_len tokens) and the last `scored` of its predictions, of ids[start + 1:end + 1],
    count. Every token after the first is scored once: the first window scores up to seq_len of them, each later
    one the next `stride` with the seq_len tokens before them as input, so a scored token sees at least
    seq_len - stride + 1 tokens (the last window more). stride = seq_len is lm-eval's loglikelihood_rolling."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be 1 to seq_len ({seq_len}), got {stride}")
    n = n_ids - 1  # tokens to predict
    done = min(seq_len, n)
    out = [(0, done, done)] if n > 0 else []
    while done < n:
        step = min(n - done, stride)
        done += step
        out.append((done - seq_len, done, step))
    return out


@torch.inference_mode()
def score_texts(model: MiniMindForCausalLM, tokenizer, texts: Iterable[str], seq_len: int = 512,
                batch_size: int = 8, progress: bool = False, stride: int | None = None) -> TextScore:
    """Each text is `<|im_start|>` + its tokens, as in pretraining (and lm-eval's prefix token for this tokenizer);
    every token after the first is scored. Texts longer than seq_len are scored in overlapping windows (`windows`,
    stride default seq_len // 2). `progress` shows a bar over the windows."""
    from tqdm import tqdm

    stride = stride or max(seq_len // 2, 1)
    bos = model.config.bos_token_id
    device = model.model.embed_tokens.weight.device
    todo: list[tuple[list[int], int]] = []  # (ids[start:end + 1], how many of the last predictions count)
    n_bytes = 0
    for text in texts:
        ids = [bos] + tokenizer.encode(text, add_special_tokens=False)
        n_bytes += len(text.encode("utf-8"))
        todo += [(ids[start:end + 1], scored) for start, end, scored in windows(len(ids), seq_len, stride)]
    tokens, nats = 0, 0.0
    bar = tqdm(total=len(todo), desc="perplexity", unit=" windows", disable=not progress, leave=False)
    for lo in range(0, len(todo), batch_size):
        chunk = todo[lo:lo + batch_size]
        width = max(len(w) - 1 for w, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        targets = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, (w, scored) in enumerate(chunk):
            ids[i, :len(w) - 1] = torch.tensor(w[:-1])
            targets[i, len(w) - 1 - scored:len(w) - 1] = torch.tensor(w[-scored:])
        keep = targets != -100
        logits = model(ids.to(device)).logits
        nats += float(token_nll(logits[keep.to(device)], targets[keep].to(device)).sum())
        tokens += int(keep.sum())
        bar.update(len(chunk))
    bar.close()
    return TextScore(tokens=tokens, bytes=n_bytes, nats=nats)
