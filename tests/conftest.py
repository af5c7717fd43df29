"""Shared fixtures: tiny random models of each family, built in memory, no network."""

import pytest
import torch

from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM

torch.set_num_threads(2)

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=128, vocab_size=320, max_position_embeddings=512)
FAMILIES = {
    "qwen3": dict(SMALL),
    "qwen3_moe": dict(SMALL, use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96),
    "llama": dict(SMALL, qk_norm=False, rms_norm_eps=1e-5),
    # MiniMind2's MoE: a shared expert beside the routed ones, no q/k-norm
    "qwen2_moe": dict(SMALL, qk_norm=False, rms_norm_eps=1e-5, use_moe=True, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=96, shared_expert_intermediate_size=80),
}


def small_model(family: str, seed: int = 0, **overrides) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(ModelConfig(**{**FAMILIES[family], **overrides}))
    # Random norm weights too, so a norm applied in the wrong place cannot hide behind weight = 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(autouse=True, scope="session")
def packed_cache(tmp_path_factory):
    """Keep the packed-data cache of every test (and the subprocesses they start) out of ~/.cache."""
    import os

    os.environ["MINIMIND_CACHE"] = str(tmp_path_factory.mktemp("packed"))


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


CORPUS = [
    "The king is dead; long live the king. What light through yonder window breaks?",
    "To be, or not to be, that is the question. 3 + 4 = 7, and 12 * 3 = 36.",
    "今天天气很好，我们一起去公园散步吧。这本书写得非常好，推荐给大家。",
    "新华社北京电，国务院今天举行新闻发布会。",
]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer (400 tokens) trained on a few generated lines."""
    from minimind.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text("\n".join(CORPUS * 50), encoding="utf-8")
    return train_tokenizer([d / "corpus.txt"], vocab_size=400, out_dir=d / "out", progress=False)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The built-in data files at a test-sized scale ({name: path}, see minimind.data.builtin)."""
    from minimind.data.builtin import write_builtin

    return write_builtin(tmp_path_factory.mktemp("builtin"), seed=0, pretrain_chars=200_000,
                         pretrain_val_chars=20_000, sft_tasks=300, val_tasks=20, heldout_tasks=40, rl_tasks=50,
                         dpo_pairs=50)


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory, demo_data):
    """A `tiny` model briefly pretrained and fine-tuned on the built-in data: a real model directory (with
    tokenizer) for the stages, servers and exporters that start from one. It has learnt the chat format,
    not the tasks."""
    from minimind.tokenizer import train_tokenizer
    from minimind.train.config import TrainConfig
    from minimind.train.loop import train
    from minimind.train.pretrain import PretrainStage
    from minimind.train.sft import SFTStage

    root = tmp_path_factory.mktemp("sft_model")
    train_tokenizer([demo_data["pretrain"], demo_data["sft"]], vocab_size=800, out_dir=root / "tokenizer",
                    progress=False)
    common = dict(seq_len=128, batch_size=8, workers=1, progress=False, log_every=100, lr=2e-3, warmup_steps=5)
    pre = train(TrainConfig(stage="pretrain", out=str(root / "pretrain"), data=str(demo_data["pretrain"]),
                            preset="tiny", tokenizer=str(root / "tokenizer"), steps=30, **common), PretrainStage)
    return train(TrainConfig(stage="sft", out=str(root / "sft"), data=str(demo_data["sft"]), init_from=str(pre),
                             steps=40, **common), SFTStage)


def minimind_loss_mask(ids: list[int], tokenizer) -> list[int]:
    """MiniMind's SFT and DPO label rule (its dataset/lm_dataset.py), written out here to compare against: from
    just after each run of the ids of `<|im_start|>assistant\\n` through the first run of `<|im_end|>\\n` after
    it, that run included (to the end of the row when none follows)."""
    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    head, tail = encode("<|im_start|>assistant\n"), encode("<|im_end|>\n")
    head, tail = [getattr(x, "ids", x) for x in (head, tail)]  # a raw tokenizers.Tokenizer gives an Encoding
    mask, i = [0] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(head)] != head:
            i += 1
            continue
        start = end = i + len(head)
        while end < len(ids) and ids[end:end + len(tail)] != tail:
            end += 1
        stop = min(end + len(tail), len(ids))
        mask[start:stop] = [1] * (stop - start)
        i = stop
    return mask
