"""Evaluation: perplexity and bits per byte against a hand computation."""

import math

import torch
from conftest import small_model

from minimind.eval.perplexity import score_texts


def test_bits_per_byte_matches_a_hand_computation(tokenizer):
    model = small_model("qwen3", vocab_size=len(tokenizer))
    texts = ["The king is dead; long live the king.", "今天天气很好。" * 6]
    score = score_texts(model, tokenizer, texts, seq_len=16, batch_size=3)  # long text spans several windows
    nats, tokens = 0.0, 0
    for text in texts:
        ids = torch.tensor([[1] + tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1)
        nats -= logp.gather(1, ids[0, 1:, None]).sum().item()
        tokens += ids.shape[1] - 1
    n_bytes = sum(len(t.encode()) for t in texts)
    assert score.tokens == tokens and score.bytes == n_bytes
    # Windows restart the context, so the long text scores differently; the short one must agree exactly.
    short = score_texts(model, tokenizer, texts[:1], seq_len=64)
    ids = torch.tensor([[1] + tokenizer.encode(texts[0], add_special_tokens=False)])
    with torch.no_grad():
        manual = -model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).sum().item()
    assert math.isclose(short.nats, manual, rel_tol=1e-5)
    assert math.isclose(short.bits_per_byte, manual / math.log(2) / len(texts[0].encode()), rel_tol=1e-5)
    assert math.isclose(short.perplexity, math.exp(manual / short.tokens), rel_tol=1e-5)


def test_thinking_format_check():
    from minimind.eval.probes import is_well_formed

    assert is_well_formed("3 + 4 = 7\n</think>\n\nThe answer is 7.", "stop")
    assert not is_well_formed("3 + 4 = 7\n</think>\n\nThe answer is 7.", "length")  # never stopped
    assert not is_well_formed("3 + 4 = 7\n</think>\n\n", "stop")  # no answer after thinking
    assert not is_well_formed("3 + 4 = 7 The answer is 7.", "stop")  # never closed the think block
    assert not is_well_formed("a</think>b</think>c", "stop")
    assert not is_well_formed("<think>a</think>b", "stop")
