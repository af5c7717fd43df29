"""Weight-only int8 quantisation (minimind.quant): the stored weights round-trip within half a step, the kernel
computes what the dequantised weights would, and a quantised model keeps the full-precision model's logits."""

import copy

import pytest
import torch
from conftest import small_model

from minimind import MiniMindError
from minimind.quant import Int8Linear, quantize, quantize_int8


@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 96), (5, 7, 96), (2, 300, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_round_trips_and_computes_with_its_weights(shape, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=False)
    with torch.no_grad():
        linear.weight[3] *= 50  # a row with much larger weights gets its own scale
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (40,)
    step = linear.weight.abs().amax(1) / 127
    assert bool(((q.dequantized() - linear.weight).abs() <= step[:, None] * 0.501).all())  # half a step
    x = torch.randn(shape).to(dtype)
    x[..., 5] *= 30  # an outlier feature sets each row's activation step
    got = q(x)
    assert got.shape == (*shape[:-1], 40) and got.dtype == dtype
    # What it computes: each row of x rounded to int8 with its own step, times the int8 weights, in exact
    # integer sums; so only the output's own rounding (bf16: 2^-8) remains against this float64 reference.
    rows = x.double().reshape(-1, 96)
    x_step = rows.abs().amax(-1, keepdim=True) / 127
    expected = ((rows / x_step).round() * x_step) @ q.dequantized().double().t()
    magnitude = rows.abs() @ q.dequantized().double().abs().t()
    tolerance = 2**-8 if dtype == torch.bfloat16 else 1e-6
    assert float(((got.double().reshape(-1, 40) - expected).abs() / magnitude).max()) < tolerance
    # Against the float layer, within the bound of the two roundings: half a step of each weight row and of
    # each activation row, |dy| <= sum_k |x_k| |dW_k| + |dx_k| |W_k| + |dx_k| |dW_k| (plus the output's rounding).
    w, dw = linear.weight.detach().double(), step.double()[:, None] / 2
    dx = x_step / 2
    bound = rows.abs() @ dw.expand_as(w).t() + dx * w.abs().sum(1) + dx * dw.sum(1) * 96
    diff = (got.double().reshape(-1, 40) - rows @ w.t()).abs()
    assert bool((diff <= bound * 1.001 + tolerance * magnitude).all())
    # Each row is rounded on its own: a row's output does not depend on the batch it is in.
    assert torch.equal(q(x.reshape(-1, 96)[-1:]), got.reshape(-1, 40)[-1:])


def test_quantised_model_keeps_the_logits(family):
    model = small_model(family)
    ids = torch.randint(3, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        quant = quantize_int8(copy.deepcopy(model))
        got = quant(ids).logits.float()
    plain = [n for n, m in quant.named_modules() if isinstance(m, torch.nn.Linear)]
    assert all(n.endswith("mlp.gate") for n in plain), plain  # only MoE routers stay unquantised
    # Each token's largest logit error relative to the logits' spread: the roundings cost a few percent, a bug
    # far more. Not the maximum over tokens: where an MoE router's top two experts are nearly tied for a token,
    # any rounding can pick another expert for it (here one token in 48 moves 0.19).
    per_token = (got - ref).abs().amax(-1) / ref.std()
    assert per_token.quantile(0.95) < 0.1, per_token
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
