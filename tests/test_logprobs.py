"""The one log-prob helper: chunked fp32 cross-entropy, token log-probs, entropy, against the plain formulas."""

import torch
import torch.nn.functional as F

from minimind import logprobs


def test_chunked_cross_entropy_equals_the_fp32_formula(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows a chunk: 4 chunks, the last partial
    torch.manual_seed(0)
    targets = torch.randint(0, 50, (10,))
    for dtype in (torch.float64, torch.bfloat16):
        logits = (4 * torch.randn(10, 50)).to(dtype).requires_grad_()
        before = logits.detach().clone()
        for weight in (None, torch.rand(50, dtype=torch.float64)):
            ours = logprobs.cross_entropy_sum(logits, targets, weight)
            ref = F.cross_entropy(logits.double(), targets, weight=weight, reduction="sum")
            (g_ours,), (g_ref,) = torch.autograd.grad(ours, logits), torch.autograd.grad(ref, logits)
            exact = dtype == torch.float64
            torch.testing.assert_close(ours.double(), ref, rtol=1e-12 if exact else 1e-6, atol=0)
            assert g_ours.dtype == dtype
            torch.testing.assert_close(g_ours, g_ref, rtol=1e-12 if exact else 1e-2, atol=0 if exact else 1e-3)
            assert torch.equal(logits.detach(), before)  # the backward does not overwrite the logits


def test_token_logprobs_equal_log_softmax_and_skip_unlabelled(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 2 * 30)  # 2 rows a chunk
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 7, 30, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, 30, (3, 7))
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    ours = logprobs.token_logprobs(logits, labels)
    full = logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    ref = torch.where(labels[:, 1:] != -100, full, torch.zeros_like(full))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert ours[0, :2].eq(0).all() and ours[2, 4:].eq(0).all()
    (g_ours,), (g_ref,) = torch.autograd.grad(ours.sum(), logits), torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logprobs.response_logps(logits, labels), ref.sum(-1), rtol=1e-12, atol=1e-12)
    # bf16 logits are scored in fp32
    assert logprobs.token_logprobs(logits.detach().bfloat16(), labels).dtype == torch.float32


def test_token_entropy_matches_the_formula(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 3 * 20)
    logits = torch.randn(8, 20, dtype=torch.float64)
    lsm = logits.log_softmax(-1)
    torch.testing.assert_close(logprobs.token_entropy(logits), -(lsm.exp() * lsm).sum(-1), rtol=1e-12, atol=1e-12)
