"""MiniMind-V's released layout: its `.pth` (decoder + `vision_proj.*`, no tower) imported with its tower's directory
gives the logits of MiniMind-V's own code on the same random weights. `pytest -m upstream tests/test_minimind_v.py`
needs MiniMind-V's repository (its model/ code and tokenizer, read with git): $MINIMIND_V_REPO, else the mirror this
project was built beside. The refusals need neither and run by default."""

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minimind import MiniMindError
from minimind.checkpoint import load_model
from minimind.commands.export import add_import_parser
from minimind.importer import import_model
from minimind.tokenizer import save_tokenizer
from minimind.vision.model import VisionLanguageModel

REPO = Path(os.environ.get("MINIMIND_V_REPO", "/work/.mirror/jingyaogong+minimind-v/repo"))
UPSTREAM_COMMIT = "9595617"  # the MiniMind-V commit these tests were written against
SHAPES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512)
TOWER = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=64,
             patch_size=8)  # 8x8 patches: 64 features per image, as MiniMind-V's SigLIP2 at 256x256 / 32


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """MiniMind-V's model package (model_vlm.py imports model_minimind.py relatively) and tokenizer, plus a random
    SigLIP tower saved by transformers, which its code loads by path."""
    if not (REPO / "HEAD").is_file() and not (REPO / ".git").exists():
        pytest.skip(f"MiniMind-V's repository is not at {REPO} (set MINIMIND_V_REPO): nothing to compare against")
    root = tmp_path_factory.mktemp("minimind_v")
    folder = root / "mmv_model"
    folder.mkdir()
    for name in ("__init__.py", "model_minimind.py", "model_vlm.py", "tokenizer.json", "tokenizer_config.json"):
        blob = subprocess.run(["git", "-C", str(REPO), "show", f"{UPSTREAM_COMMIT}:model/{name}"],
                              capture_output=True, check=True).stdout
        (folder / name).write_bytes(blob)
    spec = importlib.util.spec_from_file_location("mmv_model", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["mmv_model"] = package
    spec.loader.exec_module(package)
    vlm = importlib.import_module("mmv_model.model_vlm")

    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TOWER)).save_pretrained(root / "tower")
    SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(root / "tower")
    return vlm, folder, root / "tower"


def upstream_model(vlm, tower: Path, moe: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = vlm.VLMConfig(**SHAPES, use_moe=moe, image_hidden_size=TOWER["hidden_size"])
    model = vlm.MiniMindVLM(cfg, vision_model_path=str(tower))
    assert model.vision_encoder is not None, "MiniMind-V's code did not load the tower"
    with torch.no_grad():  # random norm weights too, so a norm in the wrong place cannot hide behind 1.0
        for name, p in model.named_parameters():  # (the tower's stay as its directory has them)
            if name.startswith("vision_encoder."):
                continue
            if name.endswith("norm.weight") or name == "vision_proj.mlp.0.weight":
                p.uniform_(0.5, 1.5)
            if name == "vision_proj.mlp.0.bias":
                p.uniform_(-0.5, 0.5)
    return model.eval()


def released_pth(theirs, path: Path) -> Path:
    """The state dict as MiniMind-V's trainers save it: everything but `vision_encoder.*` (they also halve it)."""
    torch.save({k: v.detach().clone() for k, v in theirs.state_dict().items() if not k.startswith("vision_encoder.")},
               path)
    return path


@pytest.mark.upstream
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_minimind_v_weights_import_and_match_its_code(moe, upstream, tmp_path, capsys):
    vlm, folder, tower = upstream
    theirs = upstream_model(vlm, tower, moe)
    pth = released_pth(theirs, tmp_path / f"sft_vlm_64{'_moe' if moe else ''}.pth")
    parser = argparse.ArgumentParser()
    add_import_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["import", str(pth), "--out", str(tmp_path / "ours"), "--tokenizer", str(folder),
                              "--vision-encoder", str(tower), "--max-position-embeddings", "512"])
    args.func(args)
    assert "plus a vision encoder and projector" in capsys.readouterr().out
    ours = load_model(tmp_path / "ours")
    assert isinstance(ours, VisionLanguageModel) and ours.config.use_moe == moe

    # Two rows, two images each. MiniMind-V takes its processor's output, {"pixel_values": [B, images, 3, S, S]};
    # we take the images flat, in order.
    g = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(2):
        rows.append(torch.cat([torch.randint(36, 6400, (5,), generator=g), torch.full((64,), 12),
                               torch.randint(36, 6400, (3,), generator=g), torch.full((64,), 12),
                               torch.randint(36, 6400, (7,), generator=g)]))
    ids = torch.stack(rows)
    pixels = torch.randn(2, 2, 3, 64, 64, generator=g)
    with torch.no_grad():
        want = theirs(ids, pixel_values={"pixel_values": pixels}).logits
        got = ours(ids, pixel_values=pixels.flatten(0, 1), image_counts=[2, 2]).logits
        text_only = ours(ids[:, :5]).logits
    diff = (got - want).abs().max().item()
    print(f"max abs logit difference vs MiniMind-V: {diff:.2e}")
    assert diff <= 1e-5, diff
    assert (text_only - want[:, :5]).abs().max().item() <= 1e-5  # the decoder alone, before any image
    assert (want[:, 5:] - theirs(ids).logits[:, 5:]).abs().max() > 1e-3  # the images do matter to their code


def test_a_minimind_v_pth_needs_its_tower(tmp_path, tokenizer):
    save_tokenizer(tokenizer, tmp_path / "tok")
    state = {"model.embed_tokens.weight": torch.zeros(64, 16), "vision_proj.mlp.1.weight": torch.zeros(16, 8)}
    torch.save(state, tmp_path / "sft_vlm.pth")
    with pytest.raises(MiniMindError, match="MiniMind-V checkpoint; give its vision encoder's directory"):
        import_model(tmp_path / "sft_vlm.pth", tmp_path / "out", tokenizer=tmp_path / "tok")
    # and a tower without MiniMind-V's projector is refused too
    torch.save({"model.embed_tokens.weight": torch.zeros(64, 16)}, tmp_path / "llm.pth")
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(**TOWER)).save_pretrained(tmp_path / "tower")
    with pytest.raises(MiniMindError, match="no vision_proj"):
        import_model(tmp_path / "llm.pth", tmp_path / "out", tokenizer=tmp_path / "tok",
                     vision_encoder=tmp_path / "tower")


def test_a_minimind_v_layout_pth_imports_with_its_tower(tmp_path, tokenizer):
    """Without MiniMind-V's code: our own vision model written out in its release layout (its names are ours; no
    tower, half precision) comes back from `import` with the tower's directory, its weights as they were."""
    from conftest import small_model
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TOWER)).save_pretrained(tmp_path / "tower")
    save_tokenizer(tokenizer, tmp_path / "tok")
    model = VisionLanguageModel.from_llm(small_model("qwen3", vocab_size=400), tmp_path / "tower").eval()
    state = {k: v.half() for k, v in model.state_dict().items() if not k.startswith("vision_encoder.")}
    torch.save(state, tmp_path / "sft_vlm_64.pth")
    import_model(tmp_path / "sft_vlm_64.pth", tmp_path / "out", tokenizer=tmp_path / "tok",
                 vision_encoder=tmp_path / "tower", dtype="float32", num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=512)
    ours = load_model(tmp_path / "out")
    assert isinstance(ours, VisionLanguageModel)
    assert ours.vision == model.vision
    back = ours.state_dict()
    for k, v in model.state_dict().items():
        want = v if k.startswith("vision_encoder.") else v.half().float()  # the tower comes from its directory
        assert torch.equal(back[k], want), k
