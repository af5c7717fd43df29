"""Evaluation: perplexity and bits per byte against a hand computation, rolling windows over long texts."""

import math

import pytest
import torch
from conftest import small_model

from minimind.eval.perplexity import score_texts, windows


def hand_nats(model, ids: list[int], start: int, end: int, scored: int) -> float:
    """One plain forward pass over ids[start:end]; minus the log-probs of its last `scored` predictions."""
    with torch.no_grad():
        logp = model(torch.tensor([ids[start:end]])).logits[0].log_softmax(-1)
    return -sum(logp[t - start - 1, ids[t]].item() for t in range(end - scored + 1, end + 1))


def test_bits_per_byte_matches_a_hand_computation(tokenizer):
    model = small_model("qwen3", vocab_size=len(tokenizer))
    texts = ["The king is dead; long live the king.", "今天天气很好。" * 6]
    score = score_texts(model, tokenizer, texts, seq_len=16, batch_size=3)  # long text spans several windows
    tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    assert score.tokens == tokens and score.bytes == sum(len(t.encode()) for t in texts)
    # A text within the window: one forward pass over <|im_start|> + text, every token after the first scored.
    short = score_texts(model, tokenizer, texts[:1], seq_len=64)
    ids = torch.tensor([[1] + tokenizer.encode(texts[0], add_special_tokens=False)])
    with torch.no_grad():
        manual = -model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).sum().item()
    assert math.isclose(short.nats, manual, rel_tol=1e-6)
    assert math.isclose(short.bits_per_byte, manual / math.log(2) / len(texts[0].encode()), rel_tol=1e-6)
    assert math.isclose(short.perplexity, math.exp(manual / short.tokens), rel_tol=1e-6)


@pytest.mark.parametrize("stride", [16, 6, 1])
def test_long_texts_roll_with_overlapping_windows(tokenizer, stride):
    """Every token after `<|im_start|>` is scored once; each window reads at most seq_len tokens; a token of a later
    window sees at least seq_len - stride + 1 tokens before it; the total equals plain forward passes over the
    same windows, whatever the batching."""
    model = small_model("qwen3", vocab_size=len(tokenizer))
    texts = ["今天天气很好，我们一起去公园散步吧。" * 4, "To be, or not to be."]
    ids = [1] + tokenizer.encode(texts[0], add_special_tokens=False)
    seq_len = 16
    spans = windows(len(ids), seq_len, stride)
    scored = []
    for start, end, n in spans:
        first = end - n + 1
        assert end - start <= seq_len and (start == 0 or first - start >= seq_len - stride + 1)
        scored += range(first, end + 1)
    assert scored == list(range(1, len(ids))) and len(ids) > 3 * seq_len
    assert len(spans) == 1 + math.ceil((len(ids) - 1 - seq_len) / stride)
    nats = sum(hand_nats(model, ids, *span) for span in spans)
    short = [1] + tokenizer.encode(texts[1], add_special_tokens=False)
    nats += hand_nats(model, short, 0, len(short) - 1, len(short) - 1)
    score = score_texts(model, tokenizer, texts, seq_len=seq_len, batch_size=3, stride=stride)
    assert score.tokens == len(ids) - 1 + len(short) - 1
    assert math.isclose(score.nats, nats, rel_tol=1e-5)
    # More context per token than the old windows (one token of context at each window's start) on this text.
    if stride < seq_len:
        assert score.nats != pytest.approx(score_texts(model, tokenizer, texts, seq_len=seq_len, stride=seq_len).nats)
    with pytest.raises(ValueError, match="stride must be 1 to seq_len"):
        windows(len(ids), seq_len, seq_len + 1)


def test_thinking_format_check():
    from minimind.eval.probes import is_well_formed

    assert is_well_formed("3 + 4 = 7\n</think>\n\nThe answer is 7.", "stop")
    assert not is_well_formed("3 + 4 = 7\n</think>\n\nThe answer is 7.", "length")  # never stopped
    assert not is_well_formed("3 + 4 = 7\n</think>\n\n", "stop")  # no answer after thinking
    assert not is_well_formed("3 + 4 = 7 The answer is 7.", "stop")  # never closed the think block
    assert not is_well_formed("a</think>b</think>c", "stop")
    assert not is_well_formed("<think>a</think>b", "stop")
