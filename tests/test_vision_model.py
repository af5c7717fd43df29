"""The vision-language model: image features at the <|image_pad|> runs, batched prefill with different image
counts, KV-cache decoding after it, SigLIP / CLIP towers saved by transformers, freezing, save and load."""

import pytest
import torch
from conftest import small_model

from minimind import MiniMindError
from minimind.checkpoint import load_model, save_model
from minimind.generation import SamplingParams, generate
from minimind.vision.config import IMAGE_TOKEN_ID, IMAGE_TOKENS, tiny_encoder
from minimind.vision.model import VisionLanguageModel, set_trainable

TOWER = tiny_encoder(hidden_size=32, layers=2, heads=2)  # 64x64 images, 8x8 patches: 64 features


def vlm(family: str = "qwen3", encoder=None, seed: int = 0) -> VisionLanguageModel:
    model = VisionLanguageModel.from_llm(small_model(family, seed=seed), encoder or TOWER, seed=seed)
    with torch.no_grad():  # a non-trivial projector norm, so a norm in the wrong place shows
        model.vision_proj.mlp[0].weight.uniform_(0.5, 1.5)
        model.vision_proj.mlp[0].bias.uniform_(-0.5, 0.5)
    return model.eval()


def prompt(*parts) -> list[int]:
    """Text ids (lists) and images (the string "img", 64 pads each) in order."""
    out = []
    for p in parts:
        out += [IMAGE_TOKEN_ID] * IMAGE_TOKENS if p == "img" else list(p)
    return out


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return vlm()


def test_each_image_fills_its_own_run_of_64_pads(model):
    ids = torch.tensor([prompt([40, 41], "img", [42], "img", [43]), prompt([44] * 66, "img", [45, 46])])
    pv = images(3)
    with torch.no_grad():
        x = model.embed(ids, pv, [2, 1])
        feats = model.image_features(pv)
        tokens = model.model.embed_tokens(ids)
    assert feats.shape == (3, IMAGE_TOKENS, 64)
    pads = ids == IMAGE_TOKEN_ID
    assert torch.equal(x[~pads], tokens[~pads])  # text keeps its embeddings
    assert torch.equal(x[0, 2:66], feats[0]) and torch.equal(x[0, 67:131], feats[1])
    assert torch.equal(x[1, 66:130], feats[2])


def test_swapping_two_images_swaps_what_each_run_sees(model):
    ids = torch.tensor([prompt([40, 41, 42], "img", [50, 51], "img", [60, 61, 62])])
    a, b = images(1, seed=3), images(1, seed=4)
    first = torch.tensor([prompt([40, 41, 42], "img")])
    with torch.no_grad():
        ab = model(ids, pixel_values=torch.cat([a, b]), image_counts=[2]).logits
        ba = model(ids, pixel_values=torch.cat([b, a]), image_counts=[2]).logits
        alone_a = model(first, pixel_values=a, image_counts=[1]).logits
        alone_b = model(first, pixel_values=b, image_counts=[1]).logits
    run1 = slice(3, 3 + IMAGE_TOKENS)
    torch.testing.assert_close(ab[0, run1], alone_a[0, run1], rtol=0, atol=1e-5)
    torch.testing.assert_close(ba[0, run1], alone_b[0, run1], rtol=0, atol=1e-5)
    assert (ab[0, -1] - ba[0, -1]).abs().max() > 1e-3  # the answer depends on which image came first


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_batched_prefill_with_different_image_counts_equals_one_at_a_time(family):
    model = vlm(family)
    prompts = [prompt([40, 41], "img", [42], "img", [43, 44]), prompt([45] * 9), prompt("img", [46, 47, 48])]
    counts = [2, 0, 1]
    pv = images(3)
    params = SamplingParams(temperature=0, max_new_tokens=6)
    batch = {"pixel_values": pv, "image_counts": counts}
    batched = generate(model, None, prompts, params, images=batch)
    uncached = generate(model, None, prompts, params, use_cache=False, images=batch)
    starts = [0, 2, 2]
    singles = []
    for p, n, s in zip(prompts, counts, starts):
        one = {"pixel_values": pv[s:s + n], "image_counts": [n]} if n else None
        singles.append(generate(model, None, [p], params, images=one)[0].token_ids)
    assert [r.token_ids for r in batched] == singles == [r.token_ids for r in uncached]
    # and the prefill logits themselves, left-padded in a batch vs alone
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        last = model(ids, mask, logits_to_keep=1, **batch).logits[:, -1]  # (the mask positionally, as for an LLM)
        for i, (p, n, s) in enumerate(zip(prompts, counts, starts)):
            one = model(torch.tensor([p]), pixel_values=pv[s:s + n], image_counts=[n]).logits[0, -1]
            torch.testing.assert_close(last[i], one, rtol=0, atol=1e-5)


def test_image_count_mismatches_are_errors(model):
    ids = torch.tensor([prompt([40], "img", [41])])
    with pytest.raises(MiniMindError, match="row 0 has 64 image tokens for 2 image"):
        model(ids, pixel_values=images(2), image_counts=[2])
    with pytest.raises(MiniMindError, match="64 image tokens for 2 image"):
        model(ids, pixel_values=images(2))
    with pytest.raises(MiniMindError, match=r"pixel_values must be \[N, 3, 64, 64\]"):
        model(ids, pixel_values=torch.zeros(1, 3, 32, 32), image_counts=[1])


def test_freezing_matches_minimind_v(model):
    cfg = model.config
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    proj = 2 * 32 + (32 * 64 + 64) + (64 * 64 + 64)  # LayerNorm(32), Linear(32, 64), Linear(64, 64)
    assert count(model.vision_proj) == proj
    first_last = count(model.model.layers[0]) + count(model.model.layers[cfg.num_hidden_layers - 1])
    assert set_trainable(model, 2) == proj
    assert set_trainable(model, 1) == proj + first_last
    assert set_trainable(model, 0) == proj + cfg.num_parameters()
    assert set_trainable(model, 0, train_encoder=True) == proj + cfg.num_parameters() + count(model.vision_encoder)
    # level 1 trains exactly the first and last layers: not the embeddings (tied to the head) or the final norm
    set_trainable(model, 1)
    names = {n.split(".")[0] + "." + n.split(".")[1] + ("." + n.split(".")[2] if n.startswith("model.layers") else "")
             for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"vision_proj.mlp", "model.layers.0", f"model.layers.{cfg.num_hidden_layers - 1}"}
    # gradients reach exactly what trains, through the image features
    set_trainable(model, 2)
    ids = torch.tensor([prompt([40], "img", [41, 42])])
    model.zero_grad()
    model(ids, pixel_values=images(1), image_counts=[1], labels=ids).loss.backward()
    assert model.vision_proj.mlp[1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("vision_proj."))
    # a trainable tower under bf16 autocast (as on an accelerator) gets finite gradients through the features
    set_trainable(model, 2, train_encoder=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, pixel_values=images(1), image_counts=[1], labels=ids).loss
    loss.backward()
    grad = model.vision_encoder.embeddings.patch_embedding.weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0
    with pytest.raises(MiniMindError, match="freeze_llm"):
        set_trainable(model, 3)
    set_trainable(model, 0)


def test_lora_wraps_the_decoder_not_the_tower():
    from minimind.lora import inject_lora

    model = vlm()
    names = inject_lora(model, rank=4, targets="all")
    assert names and all(n.startswith("model.layers.") for n in names)
    assert len(names) == 7 * model.config.num_hidden_layers  # q k v o gate up down


def test_save_and_load_round_trip(tmp_path):
    model = vlm("qwen3_moe", seed=2)
    save_model(model, tmp_path / "vlm")
    loaded = load_model(tmp_path / "vlm")
    assert isinstance(loaded, VisionLanguageModel)
    assert loaded.vision == model.vision
    state, back = model.state_dict(), loaded.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    ids = torch.tensor([prompt([40], "img", [41, 42])])
    with torch.no_grad():
        want = model(ids, pixel_values=images(1), image_counts=[1]).logits
        assert torch.equal(loaded(ids, pixel_values=images(1), image_counts=[1]).logits, want)


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_a_tower_saved_by_transformers_loads_and_runs(kind, tmp_path):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    shapes = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=8)
    torch.manual_seed(0)
    if kind == "siglip":
        tower, processor = SiglipVisionModel(SiglipVisionConfig(**shapes)), SiglipImageProcessor
    else:
        tower, processor = CLIPVisionModel(CLIPVisionConfig(**shapes)), CLIPImageProcessor
    tower.save_pretrained(tmp_path / "tower")
    processor(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]).save_pretrained(tmp_path / "tower")
    model = vlm(encoder=tmp_path / "tower")
    assert model.vision.image_mean == [0.4, 0.5, 0.6] and model.vision.image_std == [0.2, 0.25, 0.3]
    pv = images(2)
    with torch.no_grad():
        hidden = tower.eval()(pixel_values=pv).last_hidden_state  # CLIP's class token is dropped
        want = model.vision_proj(hidden[:, 1:] if kind == "clip" else hidden)
        torch.testing.assert_close(model.image_features(pv), want, rtol=0, atol=1e-6)
    # and through our directory, where the tower's weights sit beside the decoder's in model.safetensors
    save_model(model, tmp_path / "vlm")
    loaded = load_model(tmp_path / "vlm")
    ids = torch.tensor([prompt([40], "img", [41], "img")])
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixel_values=pv, image_counts=[2]).logits,
                           model(ids, pixel_values=pv, image_counts=[2]).logits)


def test_lfm2_vl_export_gives_our_logits_in_transformers(tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    from minimind.cli import main

    model = vlm(seed=3)
    save_model(model, tmp_path / "vlm")
    main(["export", "lfm2-vl", "--model", str(tmp_path / "vlm"), "--out", str(tmp_path / "hf")])
    assert "Lfm2VlForConditionalGeneration" in capsys.readouterr().out
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Lfm2VlForConditionalGeneration"
    assert type(hf.model.vision_tower).__name__ == "SiglipVisionModel"
    ids = torch.tensor([prompt([40, 41], "img", [42], "img", [43]), prompt([44] * 68, "img")])
    pv = images(3)
    grid = {"spatial_shapes": torch.tensor([[8, 8]] * 3), "pixel_attention_mask": torch.ones(3, 64, dtype=torch.bool)}
    with torch.no_grad():
        want = model(ids, pixel_values=pv, image_counts=[2, 1]).logits
        got = hf(input_ids=ids, pixel_values=pv, **grid).logits
    assert (got - want).abs().max().item() <= 1e-5
    # transformers' own generate after an image prefill: the same greedy tokens as ours
    ours = generate(model, None, [ids[1].tolist()], SamplingParams(temperature=0, max_new_tokens=5),
                    images={"pixel_values": pv[2:], "image_counts": [1]})[0].token_ids
    theirs = hf.generate(input_ids=ids[1:], pixel_values=pv[2:], spatial_shapes=grid["spatial_shapes"][:1],
                         pixel_attention_mask=grid["pixel_attention_mask"][:1], max_new_tokens=5, do_sample=False,
                         eos_token_id=None)
    assert theirs[0, ids.shape[1]:].tolist() == ours


def test_only_vision_models_with_siglip_towers_export(tmp_path):
    from minimind.export.lfm2_vl import export_lfm2_vl

    save_model(small_model("qwen3"), tmp_path / "llm")
    with pytest.raises(MiniMindError, match="not a vision model"):
        export_lfm2_vl(tmp_path / "llm", tmp_path / "out")


@pytest.mark.slow  # ~10 s of CPU: the demo's vision section shows learning at scale; this is the small version
def test_it_learns_to_read_an_image_through_the_tower_and_projector():
    """Red or blue image -> answer token 50 or 51, learnt from scratch by the tiny tower, the projector and the
    decoder (freeze_llm 0, train_encoder): the answer comes to follow the image."""
    model = vlm(seed=4).train()
    set_trainable(model, 0, train_encoder=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([prompt([40], "img", [41, 0])] * 8)

    def batch():
        blue = torch.randint(0, 2, (8,), generator=g)
        pv = torch.zeros(8, 3, 64, 64)
        pv[:, 0] = 1 - 2 * blue[:, None, None].float()  # red channel +1 for red, -1 for blue; blue the reverse
        pv[:, 2] = -pv[:, 0]
        labels = torch.full_like(ids, -100)
        labels[:, -1] = 50 + blue
        return pv + 0.1 * torch.randn(pv.shape, generator=g), labels

    for _ in range(20):
        pv, labels = batch()
        logits = model(ids, pixel_values=pv, image_counts=[1] * 8, logits_to_keep=2).logits[:, 0]
        loss = torch.nn.functional.cross_entropy(logits, labels[:, -1])  # only the answer: a cheaper head
        opt.zero_grad()
        loss.backward()
        opt.step()
    pv, labels = batch()
    with torch.no_grad():
        logits = model(ids, pixel_values=pv, image_counts=[1] * 8, logits_to_keep=2).logits[:, 0]
    assert torch.equal(logits.argmax(-1), labels[:, -1]), (logits.argmax(-1), labels[:, -1])
    assert loss.item() < 0.2, loss.item()  # ln 2 = 0.69 is what guessing the colour would give


def test_int8_quantisation_leaves_the_tower_and_projector_alone():
    from minimind.quant import Int8Linear, quantize_int8

    model = vlm()
    ids = torch.tensor([prompt([40], "img", [41, 42])])
    with torch.no_grad():
        want = model(ids, pixel_values=images(1), image_counts=[1]).logits
        quantize_int8(model)
        got = model(ids, pixel_values=images(1), image_counts=[1]).logits.float()
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear)
    assert not any(isinstance(m, Int8Linear) for m in [*model.vision_encoder.modules(), *model.vision_proj.modules()])
    assert (got - want).abs().max() < 0.1 * want.std()  # int8 rounding, not another model
