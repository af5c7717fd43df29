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


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param
