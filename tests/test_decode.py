"""The fixed-shape decode step (eager and compiled) and the fused projections give what the old path gives."""

import pytest
import torch
from conftest import FAMILIES, small_model

from minimind.generation import SamplingParams, generate
from minimind.lora import inject_lora, lora_modules, merge_lora
from minimind.quant import quantize_int8

PROMPTS = [[5, 17, 33, 9, 100, 42, 7, 8, 200], [11, 12], [250, 3, 99, 4]]
GREEDY = SamplingParams(max_new_tokens=20, temperature=0)


def variant(name: str) -> torch.nn.Module:
    """Every family, plus YaRN rope scaling and a merged LoRA adapter (on top of qwen3)."""
    if name == "yarn":
        model = small_model("qwen3", seed=5, rope_scaling="yarn", yarn_factor=4.0,
                            yarn_original_max_position_embeddings=16, yarn_attention_factor=None)
    elif name == "lora_merged":
        model = small_model("qwen3", seed=6)
        inject_lora(model, 4, 8.0, 0.0, "all")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
        model = merge_lora(model).eval()
    else:
        model = small_model(name, seed=2)
    model.config.eos_token_id = -1
    return model


VARIANTS = [*FAMILIES, "yarn", "lora_merged"]


@pytest.mark.parametrize("name", VARIANTS)
def test_fixed_shape_step_equals_the_growing_cache(name):
    """decode_step over a preallocated cache with a length mask gives forward()'s logits with a growing cache
    (left-padded batch), step after step; and fused q/k/v and gate/up change nothing but rounding."""
    model = variant(name)
    ids = torch.tensor([[0, 0, 0, 5, 17, 33], [11, 12, 13, 14, 15, 16]])
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    with torch.inference_mode():
        grow = model.new_cache(2, 6 + 8)
        fixed = model.new_cache(2, 32)  # longer than needed: the mask must hide the unfilled positions
        a = model(ids, attention_mask=mask, cache=grow, logits_to_keep=1).logits[:, -1]
        b = model(ids, attention_mask=mask, cache=fixed, logits_to_keep=1).logits[:, -1]
        pos = torch.tensor([fixed.length])
        for _ in range(8):
            token = a.argmax(-1)
            a = model(token[:, None], cache=grow, logits_to_keep=1).logits[:, -1]
            b = model.decode_step(token, fixed.k, fixed.v, fixed.valid, pos, fixed.next_pos)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        assert int(pos) == 14 and fixed.next_pos.tolist() == [11, 14]
        reference = generate(model, None, PROMPTS, GREEDY, compile=False)  # test_generation checks it vs no cache
        model.fuse_projections()
        assert not hasattr(model.model.layers[0].self_attn, "q_proj")
        fused = generate(model, None, PROMPTS, GREEDY, compile=False)
    assert [c.token_ids for c in fused] == [c.token_ids for c in reference]


def compiled_equals_eager(name: str, int8: bool = False) -> None:
    model = variant(name).fuse_projections()
    if int8:
        model = quantize_int8(model)
    eager = [c.token_ids for c in generate(model, None, PROMPTS, GREEDY, compile=False)]
    compiled = [c.token_ids for c in generate(model, None, PROMPTS, GREEDY, compile=True)]
    assert compiled == eager and all(len(t) == 20 for t in eager)
    # A second call with another prompt length reuses the compiled shape (cache rounded up to 128 positions).
    again = generate(model, None, PROMPTS[:1] * 3, GREEDY, compile=True)
    assert [c.token_ids for c in again] == [eager[0]] * 3


def test_compiled_step_gives_the_eager_tokens():
    """One family in the default suite: a cold compile costs 20-60 s on two cores."""
    compiled_equals_eager("qwen3")


@pytest.mark.slow
@pytest.mark.parametrize("name", [v for v in VARIANTS if v != "qwen3"] + ["qwen3_int8"])
def test_compiled_step_gives_the_eager_tokens_every_family(name):
    compiled_equals_eager(name.removesuffix("_int8"), int8=name.endswith("_int8"))
