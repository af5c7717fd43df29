"""Weight-only int8 quantisation (minimind.quant): the stored weights round-trip within half a step, the kernel
computes what the dequantised weights would, and a quantised model keeps the full-precision model's logits."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import small_model

from minimind import MiniMindError
from minimind.quant import Int8Linear, quantize, quantize_int8


# Few rows take the int8 kernel; past Int8Linear.kernel_rows (32 or 128), a dequantised copy (fp32 or bf16).
@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 96), (5, 7, 96), (2, 100, 96)])
def test_int8_linear_round_trips_and_computes_with_its_weights(shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=False)
    with torch.no_grad():
        linear.weight[3] *= 50  # a row with much larger weights gets its own scale
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (40,)
    err = (q.dequantized().float() - linear.weight).abs()
    step = linear.weight.abs().amax(1) / 127
    # Half a step from rounding, plus the bf16 scale's own rounding (2^-8 relative to the row's largest).
    assert bool((err <= step[:, None] * 0.5 + linear.weight.abs().amax(1)[:, None] * 2**-8).all())
    x = torch.randn(shape)
    xb = x.bfloat16().float()
    expected = F.linear(xb, q.dequantized())
    got = q(x)
    assert got.shape == (*shape[:-1], 40) and got.dtype == torch.bfloat16
    # bf16 output and accumulation: error small against the size of the terms summed, |x| @ |W|^T.
    magnitude = F.linear(xb.abs(), q.dequantized().abs())
    assert float(((got.float() - expected).abs() / magnitude).max()) < 1e-2


def test_quantised_model_keeps_the_logits(family):
    model = small_model(family)
    ids = torch.randint(3, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        quant = quantize_int8(copy.deepcopy(model))
        got = quant(ids).logits.float()
    plain = [n for n, m in quant.named_modules() if isinstance(m, torch.nn.Linear)]
    assert all(n.endswith("mlp.gate") for n in plain), plain  # only MoE routers stay unquantised
    # Relative to the logits' spread: int8 weights and bf16 activations cost about a percent, a bug far more.
    rel = (got - ref).abs().max() / ref.std()
    assert rel < 0.1, rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_quantised_trained_model_generates_the_same_greedy_text(sft_model_dir):
    from minimind.chat import encode_chat
    from minimind.checkpoint import load_model
    from minimind.generation import SamplingParams, generate
    from minimind.tokenizer import load_tokenizer

    tok = load_tokenizer(sft_model_dir)
    model = load_model(sft_model_dir)
    ids, _ = encode_chat(tok, [{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    ref = generate(model, tok, [ids], params)[0].token_ids
    got = generate(quantize(model, "int8"), tok, [ids], params)[0].token_ids
    assert got[:6] == ref[:6]


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(MiniMindError, match="unknown quantisation 'int4'"):
        quantize(small_model("qwen3"), "int4")
    assert quantize(model := small_model("qwen3"), "none") is model


def test_generate_command_with_quantize_int8_prints_the_quantised_model_s_text(sft_model_dir):
    import subprocess
    import sys

    from minimind.chat import encode_chat
    from minimind.checkpoint import load_model
    from minimind.generation import SamplingParams, generate
    from minimind.tokenizer import load_tokenizer

    out = subprocess.run([sys.executable, "-m", "minimind", "generate", "--model", str(sft_model_dir), "--prompt",
                          "Who are you?", "--temperature", "0", "--max-new-tokens", "10", "--quantize", "int8"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    tok = load_tokenizer(sft_model_dir)
    ids, _ = encode_chat(tok, [{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)
    model = quantize(load_model(sft_model_dir), "int8")
    assert out == generate(model, tok, [ids], SamplingParams(max_new_tokens=10, temperature=0))[0].text + "\n"
