"""Optimizers: Muon on the hidden matrices and AdamW on the rest (which parameter goes where, one Muon step
against a Newton-Schulz iteration written out here), and the schedule driving both."""

import math
import re

import pytest
import torch
from conftest import small_model

from minimind import MiniMindError
from minimind.lora import freeze_base, inject_lora
from minimind.train.config import TrainConfig
from minimind.train.loop import make_optimizers, set_lr
from minimind.train.pretrain import token_loss

CPU = torch.device("cpu")
# The hidden matrices, by name: attention and MLP projections, MoE experts, LoRA adapters.
HIDDEN = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)"
                    r"(\.lora_[AB])?\.weight")


def owners(model, optimizers) -> dict[str, list[str]]:
    """Each trainable parameter's name -> the optimizers holding it."""
    found = {name: [] for name, p in model.named_parameters() if p.requires_grad}
    names = {id(p): name for name, p in model.named_parameters()}
    for o in optimizers:
        for group in o.param_groups:
            for p in group["params"]:
                found[names[id(p)]].append(type(o).__name__)
    return found


@pytest.mark.parametrize("family,tied", [("qwen3", True), ("qwen3_moe", True), ("llama", False)])
def test_every_trainable_parameter_is_in_exactly_one_optimizer_with_hidden_matrices_in_muon(family, tied):
    model = small_model(family, tie_word_embeddings=tied)
    where = owners(model, make_optimizers(model, TrainConfig(optimizer="muon"), CPU))
    muon = {n for n, o in where.items() if o == ["Muon"]}
    adamw = {n for n, o in where.items() if o == ["AdamW"]}
    assert muon | adamw == set(where)  # each in one optimizer, exactly once
    assert muon == {n for n in where if HIDDEN.fullmatch(n)}
    # 2 layers x (4 attention + 3 MLP, or 4 experts x 3) matrices
    assert len(muon) == 2 * (4 + (12 if family == "qwen3_moe" else 3))
    assert "model.embed_tokens.weight" in adamw and ("lm_head.weight" in adamw) != tied
    if family == "qwen3_moe":
        assert {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"} <= adamw  # the routers
    assert all(o == ["AdamW"] for o in owners(model, make_optimizers(model, TrainConfig(), CPU)).values())


def test_lora_under_muon_puts_the_adapters_in_muon_and_nothing_in_adamw():
    model = small_model("qwen3")
    inject_lora(model, 4, 8.0, 0.0, "all")
    freeze_base(model)
    optimizers = make_optimizers(model, TrainConfig(optimizer="muon"), CPU)
    assert [type(o).__name__ for o in optimizers] == ["Muon"]
    where = owners(model, optimizers)
    assert len(where) == 2 * 7 * 2 and all(HIDDEN.fullmatch(n) and ".lora_" in n for n in where)


def test_unknown_optimizer_is_refused():
    with pytest.raises(MiniMindError, match="optimizer must be one of adamw, muon, not 'sgd'"):
        make_optimizers(small_model("qwen3"), TrainConfig(optimizer="sgd"), CPU)


def test_the_schedule_drives_both_optimizers_from_their_own_peak_rates():
    model = small_model("qwen3")
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=4e-3)
    optimizers = make_optimizers(model, cfg, CPU)
    set_lr(optimizers, cfg, 0.25)
    assert [g["lr"] for o in optimizers for g in o.param_groups] == [2.5e-4, 2.5e-4, 1e-3]
    set_lr(optimizers, TrainConfig(optimizer="muon", lr=1e-3), 0.5)  # muon_lr 0: Muon takes lr
    assert {g["lr"] for o in optimizers for g in o.param_groups} == {5e-4}


def test_a_stage_gives_some_parameters_their_own_peak_rate():
    """Stage.rate_of names the config field of each parameter's rate (the vision stages give the new tower and
    projector vision_lr); the schedule scales each group from its own peak, and a parameter sits in one group."""
    from minimind.train.vision import VisionSFTStage

    model = small_model("qwen3")
    own = ("model.layers.0.", "model.norm.")  # stand-ins for the tower and projector: matrices and a norm
    cfg = TrainConfig(lr=1e-3, vision_lr=4e-3)
    optimizers = make_optimizers(model, cfg, CPU, lambda name: "vision_lr" if name.startswith(own) else "lr")
    set_lr(optimizers, cfg, 0.5)
    rates = [(p, g["lr"]) for o in optimizers for g in o.param_groups for p in g["params"]]
    assert len(rates) == len({id(p) for p, _ in rates}) == len(list(model.parameters()))
    want = {id(p): 2e-3 if name.startswith(own) else 5e-4 for name, p in model.named_parameters()}
    assert all(lr == want[id(p)] for p, lr in rates)
    stage = VisionSFTStage.__new__(VisionSFTStage)
    stage.cfg = cfg
    assert [stage.rate_of(n) for n in ("vision_encoder.embeddings.patch_embedding.weight", "vision_proj.mlp.0.bias",
                                       "model.layers.0.mlp.up_proj.weight")] == ["vision_lr", "vision_lr", "lr"]
    stage.cfg = TrainConfig(lr=1e-3)  # vision_lr 0: one rate, so a run's optimizer state keeps its groups
    assert stage.rate_of("vision_proj.mlp.0.bias") == "lr"


def newton_schulz(g: torch.Tensor, dtype: torch.dtype, steps: int = 5) -> torch.Tensor:
    """The quintic iteration towards the nearest semi-orthogonal matrix (Keller Jordan's coefficients) on the
    wide orientation, after scaling to Frobenius norm 1. X <- aX + (bA + cA^2)X with A = XX^T, each bracket one
    fused multiply-add as torch does it: bfloat16 rounds each operation, and five iterations turn a different
    order of roundings into differences of a few percent."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


# bf16: torch.optim.Muon's own step; fp32: ours, for CPUs that emulate bf16 matmuls (100x slower there)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_muon_step_is_momentum_then_newton_schulz_scaled_to_adamw_rms(dtype):
    torch.manual_seed(0)
    model = small_model("qwen3", intermediate_size=96).train()  # 64 x 96 and 96 x 64: both orientations
    lr, wd, momentum = 5e-3, 0.1, 0.95
    muon = [o for o in make_optimizers(model, TrainConfig(optimizer="muon", lr=lr, weight_decay=wd), CPU)
            if isinstance(o, torch.optim.Muon)][0]
    muon.dtype = dtype
    params = [p for g in muon.param_groups for p in g["params"]]
    initial = [p.detach().clone() for p in params]
    expected = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    for step in range(2):  # the second step checks the momentum buffer and the Nesterov look-ahead
        ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(step))
        loss, _, _ = token_loss(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        grads = [p.grad.clone() for p in params]
        muon.step()
        muon.zero_grad()
        for i, (w, g) in enumerate(zip(expected, grads)):
            # buffer <- m buffer + (1 - m) g; Nesterov: update from (1 - m) g + m buffer (as lerps, torch's roundings)
            buffers[i] = buffers[i].lerp(g, 1 - momentum)
            update = newton_schulz(g.lerp(buffers[i], momentum), dtype).float()
            scaled = lr * 0.2 * math.sqrt(max(w.shape))  # adjust_lr_fn="match_rms_adamw"
            expected[i] = w * (1 - lr * wd) - scaled * update
    assert max((p.detach() - e).abs().max().item() for p, e in zip(params, expected)) < 1e-5
    # ... while the two steps moved every matrix by far more than that.
    assert min((p.detach() - w).abs().max().item() for p, w in zip(params, initial)) > 1e-3


def test_muon_training_lowers_the_loss_on_a_fixed_batch():
    model = small_model("qwen3").train()
    optimizers = make_optimizers(model, TrainConfig(optimizer="muon", lr=3e-3), CPU)
    ids = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(1))
    curve = []
    for _ in range(30):
        loss, n, _ = token_loss(model, {"input_ids": ids, "labels": ids})
        (loss / n).backward()
        curve.append(float(loss.detach() / n))
        for o in optimizers:
            o.step()
            o.zero_grad()
    assert curve[-1] < 0.5 * curve[0]
