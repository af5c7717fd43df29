"""LoRA: low-rank adapters on the linear layers of a model; inject, save and load in PEFT's layout, merge.
`names = inject_lora(model, rank=16, alpha=32)`; `minimind lora merge --model DIR --lora DIR --out DIR`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from minimind import MiniMindError
from minimind.files import atomic_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the transformers model
TARGETS = {
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qo": ("q_proj", "o_proj"),  # MiniMind's choice (its square-matrix test picks exactly these)
}
TARGETS["all-linear"] = TARGETS["all"]  # PEFT's spelling


class LoRALinear(nn.Linear):
    """y = x W^T + b + scaling * B(A(dropout(x))). The base weight is the wrapped layer's own Parameter (not
    a copy), so state-dict names stay `...q_proj.weight` and the adapter adds `...q_proj.lora_A.weight` and
    `...q_proj.lora_B.weight`, which are PEFT's names under its `base_model.model.` prefix."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)  # kaiming-uniform, as PEFT
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
        nn.init.zeros_(self.lora_B.weight)  # the adapter starts as the identity: the model is unchanged
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + scaling * B A (computed in fp32), on the same Parameter."""
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
            self.weight.copy_(self.weight.float() + delta)  # one rounding to a half-precision weight, not two
        with torch.device("meta"):
            out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.weight = self.weight
        if self.bias is not None:
            out.bias = self.bias
        return out.train(self.training)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


# ---- targets and injection ------------------------------------------------------------------------------


def _block_linears(model: nn.Module) -> list[str]:
    """Full names of the linear layers inside the decoder blocks (the embedding and lm_head stay as they are, and so
    does a vision model's tower, whose blocks are `layers` too)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{name}"
            and not name.startswith("vision_encoder.")]


def _suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # PEFT's rule for a list of target_modules


def resolve_targets(model: nn.Module, targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """"all" (q, k, v, o, gate, up, down), "qo" (MiniMind's), or module names ("q_proj,v_proj" or a list;
    a name may carry its parents, "self_attn.q_proj", matched as a suffix like PEFT does)."""
    if isinstance(targets, str):
        key = targets.strip().lower()
        names = list(TARGETS[key]) if key in TARGETS else [t.strip() for t in targets.split(",") if t.strip()]
    else:
        names = [str(t).strip() for t in targets if str(t).strip()]
    if not names:
        raise MiniMindError("lora_targets is empty: use all, qo, or module names such as q_proj,v_proj")
    linears = _block_linears(model)
    unknown = [t for t in names if not any(_suffix_match(n, t) for n in linears)]
    if unknown:
        available = {n.rsplit(".", 1)[-1] for n in linears}
        raise MiniMindError(f"lora_targets: no linear layer named {unknown[0]!r} in this model; choose all, qo, "
                            f"or from {', '.join(sorted(available))}")
    return sorted(set(names))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def inject_lora(model: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                targets: str | list[str] | tuple[str, ...] = "all", use_rslora: bool = False,
                pattern: str | None = None) -> list[str]:
    """Wrap the target linear layers in LoRALinear (in place) and return their full module names. `pattern`
    (a regex matched against whole module names, as PEFT's string target_modules) replaces `targets`."""
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise MiniMindError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1 (got {rank}, {alpha}, {dropout})")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise MiniMindError("this model already has LoRA adapters (merge them first)")
    if pattern is not None:
        names = [n for n in _block_linears(model) if re.fullmatch(pattern, n)]
    else:
        wanted = resolve_targets(model, targets)
        names = [n for n in _block_linears(model) if any(_suffix_match(n, t) for t in wanted)]
    if not names:
        raise MiniMindError(f"LoRA: no linear layer matches {pattern or targets!r}")
    for name in names:
        old = model.get_submodule(name)
        _replace(model, name, LoRALinear(old, rank, alpha, dropout, use_rslora).train(old.training))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def freeze_base(model: nn.Module) -> tuple[int, int]:
    """Train the adapters only. Returns (trainable, total) parameter counts."""
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_param(name))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back (in place); returns model.
    The result is an ordinary model: `save_model` writes it as a full model directory."""
    for name, m in lora_modules(model).items():
        _replace(model, name, m.merged())
    return model


# ---- PEFT layout ----------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, directory: str | Path, base_model_dir: str | Path | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors exactly as PEFT does (atomic), so that
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), directory)` loads it."""
    mods = lora_modules(model)
    if not mods:
        raise MiniMindError("the model has no LoRA adapters to save")
    first = next(iter(mods.values()))
    if any((m.rank, m.alpha, m.scaling) != (first.rank, first.alpha, first.scaling) for m in mods.values()):
        raise MiniMindError("save_adapter: all adapters must share one rank and alpha")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    state = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
             if is_lora_param(k)}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_dir) if base_model_dir else None, "revision": None,
        "inference_mode": True, "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout,
        "target_modules": _target_list(model, list(mods)),
        "fan_in_fan_out": False, "bias": "none", "use_rslora": first.scaling != first.alpha / first.rank,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        save_file(state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def _target_list(model: nn.Module, names: list[str]) -> list[str]:
    """Leaf names ("q_proj") when they pick exactly the injected layers, else the full module names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    picked = [n for n in _block_linears(model) if n.rsplit(".", 1)[-1] in leaves]
    return leaves if sorted(picked) == sorted(names) else sorted(names)


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """adapter_config.json, checked for what this loader supports (plain LoRA on linear layers)."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not directory.is_dir():
        raise MiniMindError(f"{directory}: LoRA adapter directory not found")
    if not path.is_file():
        raise MiniMindError(f"{path}: not found (a LoRA adapter directory holds {ADAPTER_CONFIG} and "
                            f"{ADAPTER_WEIGHTS})")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MiniMindError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise MiniMindError(f"{path}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MiniMindError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise MiniMindError(f"{path}: field {key!r} is missing")
    if not isinstance(cfg["r"], int) or cfg["r"] < 1:
        raise MiniMindError(f"{path}: field 'r' must be a positive integer, not {cfg['r']!r}")
    if not isinstance(cfg["lora_alpha"], (int, float)) or cfg["lora_alpha"] <= 0:
        raise MiniMindError(f"{path}: field 'lora_alpha' must be a positive number, not {cfg['lora_alpha']!r}")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "rank_pattern": {},
                   "alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None}
    for key, plain in unsupported.items():
        if cfg.get(key, plain) not in (plain, None, [], {}):
            raise MiniMindError(f"{path}: field {key!r} = {cfg[key]!r} is not supported (plain LoRA only)")
    return cfg


def load_adapter(model: nn.Module, directory: str | Path, merge: bool = False) -> nn.Module:
    """Inject the adapter described by `directory` (PEFT layout, ours or PEFT's) into `model` and load its
    weights, cast to the model's device and dtype. Every key and shape is checked against the model, so
    an adapter trained on another model fails with a clear message. `merge=True` folds it in at once."""
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    weights_path = directory / ADAPTER_WEIGHTS
    if weights_path.is_file():
        try:
            raw = load_file(weights_path)
        except (SafetensorError, OSError) as e:
            raise MiniMindError(f"{weights_path}: cannot read ({e})") from None
    elif (directory / "adapter_model.bin").is_file():
        raw = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise MiniMindError(f"{weights_path}: not found")
    state = {}
    for key, value in raw.items():
        key = key.removeprefix(PEFT_PREFIX).replace(".lora_A.default.", ".lora_A.").replace(
            ".lora_B.default.", ".lora_B.")
        if not is_lora_param(key):
            raise MiniMindError(f"{weights_path}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
        state[key] = value

    targets = cfg["target_modules"]
    where = f"{directory / ADAPTER_CONFIG}"
    try:
        if isinstance(targets, str) and targets.lower() not in TARGETS:
            names = inject_lora(model, cfg["r"], cfg["lora_alpha"], 0.0, use_rslora=bool(cfg.get("use_rslora")),
                                pattern=targets)
        else:
            names = inject_lora(model, cfg["r"], cfg["lora_alpha"], 0.0, targets,
                                use_rslora=bool(cfg.get("use_rslora")))
    except MiniMindError as e:
        raise MiniMindError(f"{where}: target_modules {targets!r} do not fit this model ({e})") from None

    ref = next(model.parameters())
    expected = {k: v for k, v in model.state_dict().items() if is_lora_param(k)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} tensors for layers this model lacks (e.g. {unexpected[0]})")
    if missing:
        problems.append(f"{len(missing)} adapter tensors missing (e.g. {missing[0]})")
    if wrong:
        problems.append(f"shape mismatch: {wrong[0]}" + (f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""))
    if problems:
        _uninject(model, names)
        base = cfg.get("base_model_name_or_path")
        raise MiniMindError(f"{weights_path}: adapter does not fit this model" + (f" (it was trained on {base})"
                            if base else "") + ": " + "; ".join(problems))
    model.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in state.items()}, strict=False)
    return merge_lora(model) if merge else model


def _uninject(model: nn.Module, names: list[str]) -> None:
    """Undo an injection whose weights failed to load: put the untouched base layers back."""
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.weight.zero_()
            _replace(model, name, m.merged())


# ---- `minimind lora merge` --------------------------------------------------------------------------------


def merge_to_directory(model_dir: str | Path, lora_dir: str | Path, out_dir: str | Path,
                       dtype: str | None = None) -> Path:
    """Load a base model, fold in the adapter (in fp32) and write a full model directory (tokenizer included)
    in the base's stored dtype unless `dtype` says otherwise."""
    from minimind.checkpoint import load_model, save_model
    from minimind.device import DTYPES
    from minimind.tokenizer import load_tokenizer

    model = load_model(model_dir, dtype=None)  # as stored, to learn the stored dtype
    if dtype is None:
        stored = model.model.embed_tokens.weight.dtype
        dtype = next((k for k, v in DTYPES.items() if v == stored), "float32")
    load_adapter(model.float(), lora_dir, merge=True)
    try:
        tokenizer = load_tokenizer(model_dir)
    except (MiniMindError, OSError, ValueError):
        tokenizer = None
    return save_model(model, out_dir, tokenizer, dtype=dtype)
