"""ModelConfig: every shape and option of a MiniMind decoder, the named presets, and the mapping to and
from a transformers `config.json` (model_type qwen3, qwen3_moe, qwen2_moe or llama). `ModelConfig.preset("tiny")`."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minimind import MiniMindError

# Fields of ours that transformers has no name for live under this one key in config.json.
EXTRA_KEY = "minimind"

# MiniMind's `inference_rope_scaling` (its scripts' --inference_rope_scaling): YaRN x16 over the 2,048 positions
# it trains on, with no attention temperature. `ModelConfig.with_rope_scaling("yarn")` sets exactly this.
MINIMIND_YARN = {"yarn_factor": 16.0, "yarn_original_max_position_embeddings": 2048, "yarn_beta_fast": 32.0,
                 "yarn_beta_slow": 1.0, "yarn_attention_factor": 1.0}
ROPE_SCALING_CHOICES = ("yarn", "none")


@dataclass
class ModelConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    intermediate_size: int | None = None  # None: ceil(hidden_size * pi / 64) * 64, MiniMind's rule
    vocab_size: int = 6400
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    qk_norm: bool = True  # per-head RMSNorm on q and k (Qwen3); off is the Llama/minimind2 family
    # Mixture of experts
    use_moe: bool = False
    num_experts: int = 4
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None  # None: intermediate_size
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 5e-4
    # A shared expert every token goes through, scaled by a sigmoid gate (Qwen2-MoE); 0 = none. MiniMind2's MoE
    # has one without q/k-norm: the qwen2_moe family.
    shared_expert_intermediate_size: int = 0
    # YaRN context extension (off unless rope_scaling == "yarn")
    rope_scaling: str | None = None
    yarn_factor: float = 16.0
    yarn_original_max_position_embeddings: int = 2048
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_attention_factor: float | None = 1.0  # None: 0.1 * ln(factor) + 1, the YaRN paper's choice
    # Special token ids of MiniMind's tokenizer
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    initializer_range: float = 0.02
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = math.ceil(self.hidden_size * math.pi / 64) * 64
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.use_moe and not (1 <= self.num_experts_per_tok <= self.num_experts):
            problems.append(f"num_experts_per_tok must be in 1..num_experts ({self.num_experts})")
        if self.use_moe and self.qk_norm == bool(self.shared_expert_intermediate_size):
            problems.append("an MoE model has q/k-norm and no shared expert (qwen3_moe) or a shared expert and no "
                            "q/k-norm (qwen2_moe); transformers has no model type for the other combinations")
        if self.rope_scaling not in (None, "yarn"):
            problems.append(f"rope_scaling must be 'yarn' or unset, not {self.rope_scaling!r}")
        if problems:
            raise MiniMindError("invalid model config: " + "; ".join(problems))

    def with_rope_scaling(self, kind: str | None) -> ModelConfig:
        """This config with its RoPE scaling switched: "yarn" is MiniMind's inference_rope_scaling (MINIMIND_YARN,
        whatever YaRN settings the config had), "none" turns scaling off, None keeps the config's own."""
        if kind is None:
            return self
        if kind not in ROPE_SCALING_CHOICES:
            raise MiniMindError(f"rope scaling {kind!r}: choose one of {', '.join(ROPE_SCALING_CHOICES)}")
        if kind == "none":
            return dataclasses.replace(self, rope_scaling=None)
        return dataclasses.replace(self, rope_scaling="yarn", **MINIMIND_YARN)

    # ---- presets -------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise MiniMindError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    @property
    def model_type(self) -> str:
        if self.use_moe:
            return "qwen3_moe" if self.qk_norm else "qwen2_moe"
        return "qwen3" if self.qk_norm else "llama"

    def num_parameters(self, active: bool = False) -> int:
        """Exact parameter count (tied embeddings counted once); `active` counts top-k experts only."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        attn += 2 * hd if self.qk_norm else 0
        if self.use_moe:
            experts = self.num_experts_per_tok if active else self.num_experts
            mlp = experts * 3 * d * self.moe_intermediate_size + d * self.num_experts
            if self.shared_expert_intermediate_size:
                mlp += 3 * d * self.shared_expert_intermediate_size + d  # the expert and its gate
        else:
            mlp = 3 * d * self.intermediate_size
        layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_hidden_layers * layer + d

    # ---- transformers config.json ----------------------------------------------------------------

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        arch = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                "llama": "LlamaForCausalLM"}
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling == "yarn":
            rope.update(
                rope_type="yarn",
                factor=float(self.yarn_factor),
                original_max_position_embeddings=self.yarn_original_max_position_embeddings,
                beta_fast=float(self.yarn_beta_fast),
                beta_slow=float(self.yarn_beta_slow),
            )
            if self.yarn_attention_factor is not None:
                rope["attention_factor"] = float(self.yarn_attention_factor)
        out: dict[str, Any] = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": self.dropout,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
            "dtype": dtype,
        }
        if self.model_type == "llama":
            out["mlp_bias"] = False
        if self.use_moe:
            out.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                router_aux_loss_coef=self.router_aux_loss_coef,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        if self.model_type == "qwen2_moe":
            out.update(shared_expert_intermediate_size=self.shared_expert_intermediate_size, qkv_bias=False,
                       use_sliding_window=False)
        out[EXTRA_KEY] = {"preset": self.name, "dropout": self.dropout}
        return out

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a transformers config (4.x or 5.x spelling) of a qwen3, qwen3_moe, qwen2_moe or llama model."""
        model_type = d.get("model_type")
        if model_type not in ("qwen3", "qwen3_moe", "qwen2_moe", "llama"):
            raise MiniMindError(
                f"{source}: model_type {model_type!r} is not supported (expected qwen3, qwen3_moe, qwen2_moe or llama)"
            )
        for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
            if d.get(flag):
                raise MiniMindError(f"{source}: {flag} = true is not supported")
        if model_type == "qwen2_moe" and d.get("qkv_bias", True):
            raise MiniMindError(f"{source}: qkv_bias = true (qwen2_moe's default when absent) is not supported")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise MiniMindError(f"{source}: missing field(s) {', '.join(missing)}")
        # transformers 5 keeps theta and scaling in rope_parameters; 4.x had rope_theta and rope_scaling
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise MiniMindError(f"{source}: rope type {rope_type!r} is not supported (default or yarn)")
        extra = d.get(EXTRA_KEY) or {}
        kw: dict[str, Any] = dict(
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            intermediate_size=d.get("intermediate_size"),
            vocab_size=d.get("vocab_size", 6400),
            rope_theta=float(theta),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            dropout=extra.get("dropout", d.get("attention_dropout", 0.0)),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            use_moe=model_type in ("qwen3_moe", "qwen2_moe"),
            bos_token_id=_first(d.get("bos_token_id"), 1),
            eos_token_id=_first(d.get("eos_token_id"), 2),
            pad_token_id=_first(d.get("pad_token_id"), 0),
            initializer_range=d.get("initializer_range", 0.02),
            name=extra.get("preset", "custom"),
        )
        if kw["use_moe"]:
            if d.get("decoder_sparse_step", 1) != 1 or d.get("mlp_only_layers"):
                raise MiniMindError(f"{source}: MoE with dense layers (mlp_only_layers) is not supported")
            kw.update(
                num_experts=d.get("num_experts", d.get("num_local_experts", 4)),
                num_experts_per_tok=d.get("num_experts_per_tok", 1),
                moe_intermediate_size=d.get("moe_intermediate_size"),
                norm_topk_prob=d.get("norm_topk_prob", True),
                router_aux_loss_coef=d.get("router_aux_loss_coef", 5e-4),
                shared_expert_intermediate_size=d.get("shared_expert_intermediate_size", 0)
                if model_type == "qwen2_moe" else 0,
            )
        if rope_type == "yarn":
            kw.update(
                rope_scaling="yarn",
                yarn_factor=float(rope.get("factor", 16.0)),
                yarn_original_max_position_embeddings=rope.get("original_max_position_embeddings", 2048),
                yarn_beta_fast=float(rope.get("beta_fast") or 32.0),
                yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
                yarn_attention_factor=rope.get("attention_factor"),
            )
        try:
            return cls(**kw)
        except MiniMindError as e:
            raise MiniMindError(f"{source}: {e}") from None
        except TypeError as e:
            raise MiniMindError(f"{source}: {e}") from None

    def save(self, directory: str | Path, dtype: str = "float32", extra: dict[str, Any] | None = None) -> None:
        """Write config.json; `extra` adds fields under EXTRA_KEY (a vision model's `vision` section)."""
        d = self.to_hf_dict(dtype)
        d[EXTRA_KEY].update(extra or {})
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(d, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise MiniMindError(f"{path}: not found (is {directory} a model directory?)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MiniMindError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(data, dict):
            raise MiniMindError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(data, source=str(path))

def _first(value: Any, default: int) -> int:
    """transformers allows a list of eos ids; we keep the first."""
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


PRESETS: dict[str, dict[str, Any]] = {
    # The current MiniMind family: Qwen3 layout with q/k-norm.
    "minimind-3": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                       intermediate_size=2432),
    "minimind-3-moe": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                           intermediate_size=2432, use_moe=True, num_experts=4, num_experts_per_tok=1),
    # The minimind2 family: Llama layout, no q/k-norm.
    "minimind2-small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                            intermediate_size=1408, rms_norm_eps=1e-5, qk_norm=False),
    "minimind2": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=2048, rms_norm_eps=1e-5, qk_norm=False),
    # MiniMind2-MoE (145M): 4 routed experts (top-2) and one shared expert, each as wide as a dense FFN. Its
    # shared expert has no gate; as qwen2_moe it gets one (5,120 parameters more, see minimind.importer).
    "minimind2-moe": dict(hidden_size=640, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                          intermediate_size=1728, rms_norm_eps=1e-5, qk_norm=False, use_moe=True, num_experts=4,
                          num_experts_per_tok=2, shared_expert_intermediate_size=1728, router_aux_loss_coef=0.01),
    # A few million parameters: fast enough to train in minutes on 2 CPU cores.
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=704, max_position_embeddings=2048),
}
