"""LoRA: injection and targets, PEFT-compatible adapters (transformers + peft give our logits), merging,
load errors, and the LoRA stage (frozen base, falling loss, exact resume, the identity example)."""

import argparse
import json

import pytest
import torch
from conftest import small_model
from safetensors.torch import load_file, save_file

from minimind import MiniMindError
from minimind.checkpoint import load_model, save_model
from minimind.commands.lora import add_parser as add_lora_parser
from minimind.lora import (
    LoRALinear,
    freeze_base,
    inject_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
)
from minimind.recipes.lora import identity_rows, lora_example
from minimind.tokenizer import load_tokenizer
from minimind.train.config import TrainConfig, load_config
from minimind.train.loop import train
from minimind.train.lora import LoRAStage
from minimind.train.pretrain import token_loss


def with_random_adapter(model, rank=4, alpha=8.0, targets="all", seed=1):
    """Inject, then give B random values: a fresh adapter is zero and would hide a wrong key or scaling."""
    names = inject_lora(model, rank, alpha, 0.0, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return names


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def test_targets_and_a_fresh_adapter_changes_nothing():
    model = small_model("qwen3")
    before = logits(model, IDS)
    names = inject_lora(model, 4, 8, 0.0, "all")
    assert len(names) == 2 * 7 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(logits(model, IDS), before)  # B starts at zero
    assert {n.rsplit(".", 1)[-1] for n in inject_lora(small_model("llama"), 2, 2, 0.0, "qo")} == {"q_proj", "o_proj"}
    names = inject_lora(small_model("llama"), 2, 2, 0.0, "q_proj, v_proj")
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    moe = inject_lora(small_model("qwen3_moe"), 2, 2, 0.0, "all")  # every expert's MLP, not the router
    assert len(moe) == 2 * (4 + 3 * 4) and not any(n.endswith("mlp.gate") for n in moe)
    with pytest.raises(MiniMindError, match="no linear layer named 'qkv'.*q_proj"):
        inject_lora(small_model("qwen3"), 2, 2, 0.0, "q_proj,qkv")
    with pytest.raises(MiniMindError, match="already has LoRA"):
        inject_lora(model, 2, 2, 0.0, "qo")
    # rank 4 on a 64 -> 64 q_proj: 4 * (64 + 64) parameters
    assert model.get_submodule(names[0]).lora_A.weight.numel() + model.get_submodule(names[0]).lora_B.weight.numel() \
        == 4 * 128


def test_only_adapters_get_gradients():
    model = small_model("qwen3").train()
    inject_lora(model, 4, 8, 0.0, "qo")
    trainable, total = freeze_base(model)
    assert trainable == 2 * 2 * 4 * (64 + 64)
    out = model(IDS, labels=IDS)
    out.loss.backward()
    for name, p in model.named_parameters():
        is_adapter = ".lora_" in name
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name
    assert all(float(m.lora_B.weight.grad.abs().sum()) > 0 for m in lora_modules(model).values())


@pytest.mark.parametrize("fam", ["qwen3", "llama", "qwen3_moe"])
def test_peft_loads_our_adapter_with_equal_logits(fam, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = small_model(fam)
    save_model(model, tmp_path / "base")
    with_random_adapter(model, targets="all")
    save_adapter(model, tmp_path / "adapter", base_model_dir=tmp_path / "base")
    ours = logits(model, IDS)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    base_logits = logits(hf, IDS)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    theirs = logits(peft_model, IDS)
    assert (base_logits - ours).abs().max() > 1e-2  # the adapter matters
    assert (theirs - ours).abs().max() <= 1e-5

    # And our loader reads it back onto a fresh copy of the base.
    again = load_adapter(small_model(fam), tmp_path / "adapter")
    assert not any(m.training for m in again.modules())  # injected into an eval model: eval too
    assert (logits(again, IDS) - ours).abs().max() <= 1e-6


def test_we_load_an_adapter_that_peft_wrote(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    save_model(small_model("llama"), tmp_path / "base")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj", "down_proj"],
                                               init_lora_weights=False))  # random B: a non-zero adapter
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = logits(peft_model.eval(), IDS)
    ours = load_adapter(small_model("llama"), tmp_path / "peft")
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_modules(ours)}) == ["down_proj", "v_proj"]
    assert (logits(ours, IDS) - theirs).abs().max() <= 1e-5


def test_merge_gives_the_same_logits(tmp_path):
    model = small_model("qwen3")
    save_model(model, tmp_path / "base")
    with_random_adapter(model, rank=3, alpha=5.0)
    save_adapter(model, tmp_path / "adapter", base_model_dir=tmp_path / "base")
    unmerged = logits(model, IDS)
    merge_lora(model)
    assert not lora_modules(model) and not any(".lora_" in k for k in model.state_dict())
    assert (logits(model, IDS) - unmerged).abs().max() <= 1e-5

    # The command: minimind lora merge --model base --lora adapter --out merged
    parser = argparse.ArgumentParser()
    add_lora_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lora", "merge", "--model", str(tmp_path / "base"), "--lora",
                              str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    args.func(args)
    merged = load_model(tmp_path / "merged")
    assert not lora_modules(merged)
    assert (logits(merged, IDS) - unmerged).abs().max() <= 1e-5
    base = load_model(tmp_path / "base")
    assert (logits(base, IDS) - unmerged).abs().max() > 1e-2


def test_load_adapter_errors_are_clear(tmp_path):
    model = small_model("qwen3")
    with_random_adapter(model, targets="qo")
    save_adapter(model, tmp_path / "good")
    with pytest.raises(MiniMindError, match="nowhere: LoRA adapter directory not found"):
        load_adapter(small_model("qwen3"), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MiniMindError, match="adapter_config.json: not found"):
        load_adapter(small_model("qwen3"), tmp_path / "empty")

    # An adapter trained on a wider model: shapes do not fit, and the model is left as it was.
    wide = small_model("qwen3", hidden_size=96)
    with_random_adapter(wide, targets="qo")
    save_adapter(wide, tmp_path / "wide", base_model_dir="runs/wide/model")
    target = small_model("qwen3")
    before = logits(target, IDS)
    with pytest.raises(MiniMindError, match=r"adapter does not fit this model \(it was trained on runs/wide/model\)"
                                            r".*shape mismatch: model.layers.0.self_attn.q_proj.lora_A.weight"):
        load_adapter(target, tmp_path / "wide")
    assert not lora_modules(target) and torch.equal(logits(target, IDS), before)

    # An adapter for a deeper model: tensors for layers this model lacks.
    deep = small_model("qwen3", num_hidden_layers=3)
    with_random_adapter(deep, targets="qo")
    save_adapter(deep, tmp_path / "deep")
    with pytest.raises(MiniMindError, match="4 tensors for layers this model lacks .e.g. model.layers.2"):
        load_adapter(small_model("qwen3"), tmp_path / "deep")

    config_path = tmp_path / "good" / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for change, message in [({"peft_type": "IA3"}, "only LORA adapters"), ({"r": 0}, "'r' must be a positive"),
                            ({"use_dora": True}, "'use_dora' = True is not supported"),
                            ({"target_modules": ["qkv_proj"]}, "target_modules .* do not fit this model")]:
        config_path.write_text(json.dumps({**good, **change}))
        with pytest.raises(MiniMindError, match=message):
            load_adapter(small_model("qwen3"), tmp_path / "good")
    config_path.write_text("{not json")
    with pytest.raises(MiniMindError, match="adapter_config.json: invalid JSON"):
        load_adapter(small_model("qwen3"), tmp_path / "good")
    config_path.write_text(json.dumps(good))
    state = load_file(tmp_path / "good" / "adapter_model.safetensors")
    state.pop(next(iter(state)))
    save_file(state, tmp_path / "good" / "adapter_model.safetensors")
    with pytest.raises(MiniMindError, match="1 adapter tensors missing"):
        load_adapter(small_model("qwen3"), tmp_path / "good")


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory, sft_model_dir):
    """The fine-tuned tiny model of conftest as the base, and identity rows to adapt it on. (A random base
    is a poor test: its near-uniform outputs leave a low-rank update little to grip.)"""
    root = tmp_path_factory.mktemp("lora")
    rows = identity_rows(64, seed=0)
    (root / "identity.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return root, sft_model_dir


def lora_config(setup, out, **kw) -> TrainConfig:
    root, base_dir = setup
    base = dict(stage="lora", out=str(out), data=str(root / "identity.jsonl"), init_from=str(base_dir),
                seq_len=128, batch_size=8, steps=10, lr=1e-2, warmup_steps=1, lora_rank=4, lora_alpha=8.0,
                lora_dropout=0.1, log_every=1, progress=False, threads=1, workers=1, dtype="float32")
    return TrainConfig(**{**base, **kw})


def test_lora_stage_trains_adapters_only_and_resumes_exactly(lora_setup, tmp_path):
    root, base_dir = lora_setup
    base_state = {k: v.clone() for k, v in load_model(base_dir).state_dict().items()}
    out = train(lora_config(lora_setup, tmp_path / "run", save_every=5, keep_last=2), LoRAStage)
    assert out.parent == tmp_path / "run"
    adapter = tmp_path / "run" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.1)
    assert config["base_model_name_or_path"] == str(base_dir)

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10

    # The base is bitwise unchanged, in the base directory and in the trained checkpoint.
    assert all(torch.equal(v, base_state[k]) for k, v in load_model(base_dir).state_dict().items())
    ckpt = load_file(tmp_path / "run" / "checkpoints" / "step_10" / "model.safetensors")
    base_keys = [k for k in ckpt if ".lora_" not in k]
    assert len(base_keys) == len(base_state) - 1  # tied lm_head is not stored
    assert all(torch.equal(ckpt[k], base_state[k]) for k in base_keys)
    assert len(ckpt) - len(base_keys) == 2 * 7 * 4  # lora_A and lora_B on 7 layers x 4 blocks (tiny)

    # Resume from step 5 (as after a kill): the same adapter, bit for bit.
    final = load_file(adapter / "adapter_model.safetensors")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_5\n")
    train(lora_config(lora_setup, tmp_path / "run", save_every=5, keep_last=2, resume=True), LoRAStage)
    resumed = load_file(adapter / "adapter_model.safetensors")
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)

    # Loss on a fixed batch of the training rows falls (the logged losses are of different batches: noisy).
    cfg = lora_config(lora_setup, tmp_path / "run")
    stage = LoRAStage(cfg, load_tokenizer(base_dir))
    data = stage.dataset(cfg.data)
    batch = stage.collate([data[i] for i in range(16)])
    before, n = token_loss(load_model(base_dir), batch)[:2]
    after, _ = token_loss(load_adapter(load_model(base_dir), adapter), batch)[:2]
    assert float(after) / n < float(before) / n - 0.3, (float(before) / n, float(after) / n)


def test_lora_config_and_errors(lora_setup, tmp_path):
    cfg = load_config("configs/lora.toml", ["--lora-rank", "8", "--lora-targets", "q_proj,v_proj"], stage="lora")
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lr, cfg.seq_len) == (8, 16.0, "q_proj,v_proj",
                                                                                      1e-4, 340)
    with pytest.raises(MiniMindError, match="LoRA adapts an existing model: set init_from"):
        train(lora_config(lora_setup, tmp_path / "r", init_from="", tokenizer=str(lora_setup[1])), LoRAStage)
    with pytest.raises(MiniMindError, match="no linear layer named 'qkv'"):
        train(lora_config(lora_setup, tmp_path / "r", lora_targets="qkv"), LoRAStage)


def test_identity_rows_are_valid_sft_rows_in_two_languages():
    from minimind.data.formats import parse_row

    rows = identity_rows(10, seed=3, name="Nova")
    assert rows == identity_rows(10, seed=3, name="Nova") and rows != identity_rows(10, seed=4, name="Nova")
    for row in rows:
        parse_row(row, "sft")
        reply = row["conversations"][-1]["content"]
        assert "Nova" in reply and ("LoRA" in reply)
    assert sum("我" in r["conversations"][-1]["content"] for r in rows) == 5


def reply_nll(model, tokenizer, question: str, reply: str) -> float:
    """Mean negative log-likelihood per token of `reply` as the assistant's answer to `question`."""
    from minimind.chat import encode_chat

    ids, mask = encode_chat(tokenizer, [{"role": "user", "content": question}, {"role": "assistant", "content": reply}])
    ids, mask = torch.tensor([ids]), torch.tensor([mask], dtype=torch.bool)
    logp = torch.log_softmax(logits(model, ids)[0, :-1].float(), -1)
    picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return float(-picked[mask[0, 1:]].mean())


def test_identity_example_teaches_the_new_name(sft_model_dir, tmp_path):
    from minimind.tokenizer import load_tokenizer

    rows = lora_example(sft_model_dir, tmp_path / "example", rows=96, steps=16, lr=2e-2, batch_size=8, max_new_tokens=8,
                        questions=("Who are you?", "你是谁？"), dtype="float32", threads=2)
    assert [q for q, _, _ in rows] == ["Who are you?", "你是谁？"]
    assert all(isinstance(b, str) and isinstance(a, str) for _, b, a in rows)
    # The answer it was taught is now far more likely (the barely trained test model needs more steps than a
    # test can afford before greedy decoding says it).
    tokenizer = load_tokenizer(sft_model_dir)
    base = load_model(sft_model_dir)
    adapted = load_adapter(load_model(sft_model_dir), tmp_path / "example" / "adapter")
    for question, reply in [("Hey, what should I call you?", "I am LoRA-Mind, a small model adapted with LoRA."),
                            ("打扰一下，你叫什么名字？", "我是 LoRA-Mind，一个用 LoRA 微调过的小模型。")]:
        before, after = reply_nll(base, tokenizer, question, reply), reply_nll(adapted, tokenizer, question, reply)
        assert after < before - 0.3, (question, before, after)  # measured: 0.45-0.5 lower
