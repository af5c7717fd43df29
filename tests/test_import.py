"""`minimind import`: transformers directories and MiniMind .pth state dicts, checked logits against the source.
Run: .venv/bin/pytest tests/test_import.py"""

import json

import pytest
import torch
from conftest import FAMILIES, small_model
from transformers import AutoConfig, AutoModelForCausalLM

from minimind import MiniMindError
from minimind.checkpoint import load_model
from minimind.commands.export import add_import_parser
from minimind.importer import import_model
from minimind.tokenizer import load_tokenizer, save_tokenizer


def batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[mask == 0] = 0
    return ids, mask


def max_diff(ours, theirs, ids, mask) -> float:
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = theirs(ids, attention_mask=mask, position_ids=pos).logits
    return (a[mask.bool()] - b[mask.bool()]).abs().max().item()


def transformers_model(family: str, vocab: int):
    """A model built and initialised by transformers itself, with random norm weights."""
    fields = {k: v for k, v in small_model(family, vocab_size=vocab).config.to_hf_dict().items() if k != "minimind"}
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_transformers_directory(family, tokenizer, tmp_path):
    theirs = transformers_model(family, len(tokenizer))
    assert type(theirs).__name__ == {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                                     "qwen2_moe": "Qwen2MoeForCausalLM", "llama": "LlamaForCausalLM"}[family]
    src = tmp_path / "hf"
    theirs.save_pretrained(src)
    # Without a tokenizer in SRC or --tokenizer: a clear error, nothing written.
    with pytest.raises(MiniMindError, match="no tokenizer.json.*--tokenizer"):
        import_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_tokenizer(tokenizer, src)
    out = import_model(src, tmp_path / "out")
    ours = load_model(out)
    assert ours.config.model_type == family
    assert max_diff(ours, theirs, *batch(len(tokenizer))) <= 1e-4
    assert len(load_tokenizer(out)) == len(tokenizer)
    # ... and transformers reads what we wrote.
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_diff(ours, again, *batch(len(tokenizer))) <= 1e-4


def test_import_minimind_custom_code_export(tokenizer, tmp_path):
    """MiniMind's `model_type: minimind` export (config fields of MiniMindConfig, transformers' weight names)."""
    source = small_model("qwen3_moe", vocab_size=len(tokenizer))
    src = tmp_path / "mm"
    from minimind.checkpoint import save_model

    save_model(source, src, tokenizer)
    cfg = json.loads((src / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "num_experts", "minimind")}
    cfg.update(model_type="minimind", architectures=["MiniMindForCausalLM"], use_moe=True, rope_theta=1e6,
               num_experts=4, auto_map={"AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"})
    (src / "config.json").write_text(json.dumps(cfg))
    ours = load_model(import_model(src, tmp_path / "out"))
    ids, mask = batch(len(tokenizer))
    with torch.no_grad():
        assert torch.allclose(ours(ids, attention_mask=mask).logits, source(ids, attention_mask=mask).logits,
                              atol=1e-5)


def minimind_state_dict(model) -> dict:
    """What MiniMind's trainers save: every key (lm_head too, although tied), in fp16 on the GPU run's side."""
    return {k: v.detach().clone().half() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "llama"])
def test_import_pth_state_dict(family, tokenizer, tmp_path):
    source = small_model(family, vocab_size=len(tokenizer))
    state = minimind_state_dict(source)
    if family == "qwen3":
        state = {"_orig_mod." + k: v for k, v in state.items()}  # saved from a compiled model
    elif family == "llama":
        state = {"module." + k: v for k, v in state.items()}  # saved from DDP
    assert "lm_head.weight" in {k.split(".", 1)[1] if family != "qwen3_moe" else k for k in state}
    pth = tmp_path / "full_sft_64.pth"
    torch.save(state, pth)
    tok_dir = tmp_path / "tok"
    save_tokenizer(tokenizer, tok_dir)
    # The shapes the weights cannot show (kv heads without q/k-norm) come from flags, as in MiniMind's scripts.
    flags = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama":
        flags["rms_norm_eps"] = 1e-5
    if family == "qwen3_moe":
        flags["num_experts_per_tok"] = 2
    out = import_model(pth, tmp_path / "out", tokenizer=tok_dir, **flags)
    ours = load_model(out, dtype=None)
    assert ours.model.embed_tokens.weight.dtype == torch.float16  # kept as stored
    assert ours.config.model_type == family and ours.config.use_moe == (family == "qwen3_moe")
    # Same logits as the source model run with the same (fp16-rounded) weights.
    reference = small_model(family, vocab_size=len(tokenizer))
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.half().float())
    ids, mask = batch(len(tokenizer))
    with torch.no_grad():
        a = ours.float()(ids, attention_mask=mask).logits
        b = reference(ids, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max().item() <= 1e-4


def test_import_pth_errors(tokenizer, tmp_path):
    tok_dir = tmp_path / "tok"
    save_tokenizer(tokenizer, tok_dir)
    pth = tmp_path / "w.pth"
    torch.save(minimind_state_dict(small_model("qwen3", vocab_size=len(tokenizer))), pth)
    with pytest.raises(MiniMindError, match=r"shape mismatch: model.layers.0.mlp.gate_proj.weight \(128, 64\)"):
        import_model(pth, tmp_path / "out", tokenizer=tok_dir, intermediate_size=256)
    with pytest.raises(MiniMindError, match=r"missing.*model.layers.2"):
        import_model(pth, tmp_path / "out", tokenizer=tok_dir, num_hidden_layers=3)
    with pytest.raises(MiniMindError, match="no tokenizer.json"):
        import_model(pth, tmp_path / "out")
    (tmp_path / "bad.pth").write_bytes(b"not a pickle")
    with pytest.raises(MiniMindError, match="bad.pth: cannot read"):
        import_model(tmp_path / "bad.pth", tmp_path / "out", tokenizer=tok_dir)
    torch.save({"embed": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(MiniMindError, match="not MiniMind's key names"):
        import_model(tmp_path / "other.pth", tmp_path / "out", tokenizer=tok_dir)
    state = minimind_state_dict(small_model("qwen3", vocab_size=len(tokenizer)))
    torch.save({**state, "model.layers.abc.w": torch.zeros(2)}, tmp_path / "abc.pth")
    with pytest.raises(MiniMindError, match=r"abc.pth: key 'model.layers.abc.w': layer index 'abc' is not a number"):
        import_model(tmp_path / "abc.pth", tmp_path / "out", tokenizer=tok_dir)
    # One stray huge index is refused from the keys alone, before a model of 1e8 layers is built (hours).
    huge = {k.replace("model.layers.1.", "model.layers.100000000."): v for k, v in state.items()}
    torch.save(huge, tmp_path / "huge.pth")
    with pytest.raises(MiniMindError, match=r"huge.pth: the weights' layers are not numbered 0..1 \(no layer 1, "
                                            r"highest index 100000000\)"):
        import_model(tmp_path / "huge.pth", tmp_path / "out", tokenizer=tok_dir)
    assert not (tmp_path / "out").exists()


def test_import_cli(tokenizer, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_import_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["import", "x.pth", "--out", "o", "--use_moe", "1", "--hidden-size", "64"])
    assert args.use_moe == 1 and args.hidden_size == 64
    tok_dir = tmp_path / "tok"
    save_tokenizer(tokenizer, tok_dir)
    pth = tmp_path / "w.pth"
    torch.save(minimind_state_dict(small_model("qwen3", vocab_size=len(tokenizer))), pth)
    args = parser.parse_args(["import", str(pth), "--out", str(tmp_path / "out"), "--tokenizer", str(tok_dir),
                              "--num-attention-heads", "4", "--num-key-value-heads", "2"])
    args.func(args)
    assert "qwen3, " in capsys.readouterr().out
    args = parser.parse_args(["import", str(pth), "--out", str(tmp_path / "o2"), "--tokenizer", str(tok_dir),
                              "--intermediate-size", "256"])
    with pytest.raises(MiniMindError, match="gate_proj"):
        args.func(args)


def test_rope_scaling_at_import_and_as_a_load_override(tokenizer, tmp_path):
    """`--rope-scaling yarn` (or MiniMind's `--inference_rope_scaling`) writes MiniMind's YaRN dict: the imported
    model's logits are those of a model whose config has that dict, transformers reads the same rope scaling and
    gives the same logits, and the same switch at load time (chat, serve, eval) does it for a plain import."""
    import argparse

    from minimind.checkpoint import model_from_state
    from minimind.config import MINIMIND_YARN, ModelConfig

    source = small_model("qwen3", vocab_size=len(tokenizer), max_position_embeddings=32768)
    pth = tmp_path / "full_sft_64.pth"
    torch.save({k: v.detach().clone() for k, v in source.state_dict().items()}, pth)
    tok_dir = tmp_path / "tok"
    save_tokenizer(tokenizer, tok_dir)
    parser = argparse.ArgumentParser()
    add_import_parser(parser.add_subparsers(dest="command"))
    common = ["--tokenizer", str(tok_dir), "--num-attention-heads", "4", "--num-key-value-heads", "2",
              "--max-position-embeddings", "32768"]
    for name, flag in (("yarn", ["--rope-scaling", "yarn"]), ("yarn2", ["--inference_rope_scaling"]), ("plain", [])):
        args = parser.parse_args(["import", str(pth), "--out", str(tmp_path / name), *common, *flag])
        args.func(args)

    written = json.loads((tmp_path / "yarn" / "config.json").read_text())["rope_parameters"]
    assert written == {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 2048,
                       "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}
    assert (tmp_path / "yarn2" / "config.json").read_text() == (tmp_path / "yarn" / "config.json").read_text()
    theirs_cfg = AutoConfig.from_pretrained(tmp_path / "yarn")
    assert {k: theirs_cfg.rope_parameters[k] for k in written} == written

    reference_cfg = ModelConfig(**{**source.config.__dict__, "rope_scaling": "yarn", **MINIMIND_YARN})
    reference = model_from_state(reference_cfg, source.state_dict(), "reference", torch.float32)
    ids = torch.randint(3, len(tokenizer), (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids).logits
        imported = load_model(tmp_path / "yarn")(ids).logits
        overridden = load_model(tmp_path / "plain", rope_scaling="yarn")(ids).logits
        plain = load_model(tmp_path / "plain")(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "yarn", dtype=torch.float32).eval()(ids).logits
        off = load_model(tmp_path / "yarn", rope_scaling="none")(ids).logits
    assert torch.equal(imported, want) and torch.equal(overridden, want) and torch.equal(off, plain)
    assert (hf - want).abs().max().item() <= 1e-4
    assert (plain - want).abs().max().item() > 1e-2  # YaRN changes the logits: the checks above can fail

    # chat, generate, eval, serve and webui share these flags and load through them
    from minimind.commands.flags import add_model_flags, load_model_from

    flags = argparse.ArgumentParser()
    add_model_flags(flags)
    for switch in (["--rope-scaling", "yarn"], ["--inference-rope-scaling"]):
        args = flags.parse_args(["--model", str(tmp_path / "plain"), "--device", "cpu", "--dtype", "float32", *switch])
        model, _ = load_model_from(args)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)
