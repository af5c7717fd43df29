"""The model against transformers' own classes: same weights, same logits, same greedy tokens."""

import json

import pytest
import torch
from conftest import FAMILIES, small_model
from transformers import AutoConfig, AutoModelForCausalLM

from minimind import MiniMindError
from minimind.checkpoint import load_model, save_model
from minimind.config import PRESETS, ModelConfig
from minimind.generation import SamplingParams, generate
from minimind.model import MiniMindForCausalLM

EXPECTED = {
    "minimind-3": (63_912_192, 63_912_192),
    "minimind-3-moe": (198_416_640, 63_936_768),
    "minimind2-small": (25_829_888, 25_829_888),
    "minimind2": (104_030_976, 104_030_976),
    # MiniMind's own count is 145,029,760: ours adds the qwen2_moe shared-expert gate, 640 weights per layer
    "minimind2-moe": (145_034_880, 91_950_720),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        model = MiniMindForCausalLM(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == cfg.num_parameters()
    if name in EXPECTED:
        assert (cfg.num_parameters(), cfg.num_parameters(active=True)) == EXPECTED[name]
    else:
        assert 1_000_000 < counted < 10_000_000  # tiny: a few million


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(MiniMindError, match="unknown preset 'minimind-4'.*minimind-3"):
        ModelConfig.preset("minimind-4")


def padded_batch(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as batched generation uses
    mask[2, :9] = 0
    ids[mask == 0] = 0
    return ids, mask


def hf_position_ids(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def test_logits_match_transformers(family, tmp_path):
    ours = small_model(family)
    save_model(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                                     "qwen2_moe": "Qwen2MoeForCausalLM", "llama": "LlamaForCausalLM"}[family]
    ids, mask = padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = theirs(ids, attention_mask=mask, position_ids=hf_position_ids(mask)).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers(family, tmp_path):
    ours = small_model(family, seed=3)
    save_model(ours, tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = [[5, 17, 33, 9, 100, 42, 7], [11, 12], [250, 3, 99, 4]]
    params = SamplingParams(max_new_tokens=20, temperature=0)
    # No eos: both sides must produce exactly 20 tokens, so make eos unreachable on both.
    ours.config.eos_token_id = theirs.generation_config.eos_token_id = ours.config.vocab_size + 1
    got = [c.token_ids for c in generate(ours, None, prompts, params)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ref = theirs.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                          eos_token_id=ours.config.vocab_size + 1)[:, width:]
    assert got == ref.tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loads_directory_written_by_transformers(family, tmp_path):
    ours = small_model(family, seed=5)
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in ours.config.to_hf_dict().items() if k != "minimind"})
    torch.manual_seed(7)
    theirs = AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():  # give norms non-trivial weights
        for name, p in theirs.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    theirs.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    ids, mask = padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        a = loaded(ids, attention_mask=mask).logits
        b = theirs(ids, attention_mask=mask, position_ids=hf_position_ids(mask)).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= 1e-4


def test_yarn_matches_transformers(tmp_path):
    ours = small_model("qwen3", rope_scaling="yarn", yarn_factor=4.0, yarn_original_max_position_embeddings=64,
                       yarn_attention_factor=None)
    save_model(ours, tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 320, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert ModelConfig.load(tmp_path).rope_scaling == "yarn"


def test_moe_aux_loss_and_training_loss():
    model = small_model("qwen3_moe").train()
    ids = torch.randint(3, 320, (2, 16))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    # Perfectly balanced routing gives coef * E * sum(1/E * 1/E) * E = coef per layer; real routing is >= that
    # only in expectation, so just check the scale.
    assert out.aux_loss.item() < 10 * model.config.router_aux_loss_coef * model.config.num_hidden_layers
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual)
    (out.loss + out.aux_loss).backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_logits_to_keep_and_tied_embeddings():
    model = small_model("qwen3")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(3, 320, (2, 10))
    with torch.no_grad():
        full, last = model(ids).logits, model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 320)
    assert torch.allclose(full[:, -1:], last, atol=1e-6)


def test_logits_mask_and_the_training_loss_that_uses_it(family):
    from minimind.train.pretrain import token_loss

    model = small_model(family)
    ids = torch.randint(3, 320, (3, 12))
    labels = ids.clone()
    labels[0, :7] = -100  # an SFT row: prompt without targets
    labels[2, 9:] = -100  # right padding
    keep = torch.zeros(3, 12, dtype=torch.bool)
    keep[0, 3], keep[1, 5:], keep[2, 0] = True, True, True
    with torch.no_grad():
        full = model(ids).logits
        assert torch.allclose(model(ids, logits_mask=keep).logits, full[keep], atol=1e-5)
        weight = torch.rand(320)
        loss, n, _ = token_loss(model, {"input_ids": ids, "labels": labels}, weight)
    expected = torch.nn.functional.cross_entropy(full[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), weight=weight,
                                                 ignore_index=-100, reduction="sum")
    assert n == int((labels[:, 1:] != -100).sum()) == 5 + 11 + 8
    assert torch.allclose(loss, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="logits_mask"):
        model(ids, labels=ids, logits_mask=keep)


def test_blocked_attention_equals_sdpa_with_grouped_heads():
    from minimind.blocked_attention import causal_attention

    torch.manual_seed(0)
    for heads, kv, length in [(4, 2, 130), (4, 4, 64), (6, 2, 7)]:  # partial last block, one block, tiny
        q = torch.randn(2, heads, length, 16, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(2, kv, length, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
        grad = torch.randn(2, heads, length, 16, dtype=torch.float64)
        ours = causal_attention(q, k, v)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(ours, sdpa, rtol=0, atol=1e-12)
        for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(sdpa, (q, k, v), grad)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # A row's numbers do not depend on how long its batch is (fp32, bit for bit): positions past 100 are padding.
    q, k, v = (torch.randn(2, 4, 120, 16, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 4, 120, 16)
    grad[:, :, 100:] = 0
    long = causal_attention(q, k, v)
    short = causal_attention(q[:, :, :100], k[:, :, :100], v[:, :, :100])
    assert torch.equal(long[:, :, :100], short)
    grads_long = torch.autograd.grad(long, (q, k, v), grad)
    grads_short = torch.autograd.grad(short, (q, k, v), grad[:, :, :100])
    for a, b in zip(grads_long, grads_short):
        assert torch.equal(a[:, :, :100], b[:, :, :100])


def test_one_query_attention_equals_sdpa():
    """The decoding attention (one query per row over the cache) against SDPA: grouped heads, a mask with a
    padded row and an idle row (every key masked: zeros, as SDPA gives), and bf16 inputs (fp32 inside)."""
    from minimind.model import one_query_attention

    torch.manual_seed(0)
    q = torch.randn(3, 6, 1, 16, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 9, 16, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :4] = False  # left padding
    mask[2] = False  # an idle serving slot
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for m in (None, mask):
        torch.testing.assert_close(one_query_attention(q, k, v, m), sdpa(q, k, v, attn_mask=m, enable_gqa=True),
                                   rtol=0, atol=1e-12)
    assert one_query_attention(q, k, v, mask)[2].abs().max() == 0
    # The decode step's form: the last key and value given apart (not yet in the cache), always attended (so the
    # idle row, whose outputs serving drops, is left out of the comparison).
    apart = one_query_attention(q, k[:, :, :-1], v[:, :, :-1], mask[..., :-1], k[:, :, -1:], v[:, :, -1:])
    torch.testing.assert_close(apart[:2], sdpa(q, k, v, attn_mask=mask, enable_gqa=True)[:2], rtol=0, atol=1e-12)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ours = one_query_attention(qb, kb, vb, mask)
    assert ours.dtype == torch.bfloat16
    want = sdpa(qb.double(), kb.double(), vb.double(), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(ours.double(), want, rtol=0, atol=2e-2)  # bf16 output rounding only


def test_cpu_training_takes_the_blocked_attention_with_the_same_gradients(family, monkeypatch):
    from minimind import blocked_attention

    ids = torch.randint(3, 320, (3, 150))
    padding = torch.ones(3, 150, dtype=torch.long)
    padding[0, 140:], padding[1, :5] = 0, 0  # right padding (SFT, DPO), left padding (RL prompts)
    calls = []
    real = blocked_attention.causal_attention
    monkeypatch.setattr(blocked_attention, "causal_attention", lambda *a: calls.append(1) or real(*a))

    def step(max_len: int):
        monkeypatch.setattr(blocked_attention, "MAX_LEN", max_len)
        model = small_model(family).double().train()
        loss = model(ids, labels=ids).loss + model(ids, attention_mask=padding).logits[padding.bool()].square().mean()
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    blocked, sdpa = step(1024), step(0)
    assert len(calls) == 4  # both layers of both forwards of the first run, none of the second
    torch.testing.assert_close(blocked[0], sdpa[0], rtol=0, atol=1e-12)
    assert blocked[1].keys() == sdpa[1].keys()
    for name in sdpa[1]:
        torch.testing.assert_close(blocked[1][name], sdpa[1][name], rtol=0, atol=1e-10, msg=name)
    with torch.no_grad():  # inference keeps SDPA
        small_model(family)(ids)
    assert len(calls) == 4


def test_bf16_save_and_load_round_trip(tmp_path):
    model = small_model("qwen3")
    save_model(model, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_model(tmp_path, dtype=None)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight.bfloat16())


def test_bad_model_directories_give_one_line_errors(tmp_path):
    with pytest.raises(MiniMindError, match="model directory not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MiniMindError, match=r"config.json: not found"):
        load_model(tmp_path / "empty")
    save_model(small_model("qwen3"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96}))
    with pytest.raises(MiniMindError, match=r"config.json.*shape mismatch: model\.embed_tokens\.weight"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(MiniMindError, match=r"missing \(e.g. model.layers.2"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(MiniMindError, match="config.json: invalid JSON"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(MiniMindError, match="model_type 'gpt2' is not supported"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MiniMindError, match="model.safetensors: cannot read weights"):
        load_model(tmp_path / "m")


def test_nan_weights_and_absurd_configs_fail_before_allocating(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    save_model(small_model("qwen3"), tmp_path)
    weights, cfg = load_file(tmp_path / "model.safetensors"), json.loads((tmp_path / "config.json").read_text())
    # All-NaN weights (a diverged run) are an error at load, not a multinomial traceback at the first sample.
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, tmp_path / "model.safetensors")
    with pytest.raises(MiniMindError, match=r"model.safetensors: 24 weight tensors hold NaN or infinite values"):
        load_model(tmp_path)
    save_file(weights, tmp_path / "model.safetensors")
    # Sizes the weights do not have are found on the meta device: nothing is allocated for them.
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda *a, **k: pytest.fail("allocated before the check"))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 200000}))
    with pytest.raises(MiniMindError, match=r"shape mismatch: model.embed_tokens.weight \(320, 64\) vs config "
                                            r"\(320, 200000\) and 19 more"):
        load_model(tmp_path)
    # A layer count far beyond the file's is refused before even the meta model is built (1e8 layers: hours).
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 100_000_000}))
    with pytest.raises(MiniMindError, match=r"99999998 layer\(s\) missing \(e.g. model.layers.2.\*; config.json "
                                            r"has 100000000, the weights 2\)"):
        load_model(tmp_path)


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    good = small_model("qwen3")
    save_model(good, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("minimind.checkpoint.save_file", boom)
    with pytest.raises(RuntimeError):
        save_model(small_model("qwen3", seed=9), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary debris
