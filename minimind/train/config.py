"""TrainConfig: every setting of a training run, read from a TOML file plus `--key value` overrides.
`cfg = load_config("configs/tiny_pretrain.toml", ["--lr", "1e-3"], stage="pretrain")`."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from minimind import MiniMindError


@dataclass
class TrainConfig:
    stage: str = "pretrain"
    # run directory; default runs/<stage>. (Not "--run": torchrun would take that for its own --run-path.)
    out: str = ""
    # data
    data: str = ""  # training file (MiniMind JSONL, or .txt for pretraining)
    val_data: str = ""  # optional held-out file of the same kind for validation loss
    skip_bad: bool = False  # skip (and count) bad lines instead of refusing the file
    doc_mask: bool = True  # pretrain: each packed document attends only to itself, RoPE positions restart
    workers: int = 0  # tokenizer processes for packing (0: one per CPU core)
    cache_dir: str = ""  # packed-data cache (default: $MINIMIND_CACHE or ~/.cache/minimind/packed)
    system_prompt_prob: float = 0.0  # SFT: add a random system prompt to this share of chats (MiniMind: 0.2)
    keep_empty_think_prob: float = 1.0  # SFT: keep empty think blocks in this share of chats (MiniMind: 0.2)
    tag_loss_weight: float = 1.0  # SFT: loss weight of the <think>/</think>/<tool_call>/</tool_call> tokens
    # SFT: whether the trained model thinks when a chat says nothing about it (written into its chat template,
    # read by chat, generate, serve and the web page): auto = when most training conversations carry thinking
    thinks_by_default: str = "auto"
    # SFT, LoRA, distill and DPO: the "\n" after each assistant <|im_end|> carries loss too, as MiniMind's labels
    # do; off: loss stops at <|im_end|>, as in transformers and TRL (that newline is the template's to write)
    train_newline_after_eos: bool = False
    # model
    init_from: str = ""  # a model directory from an earlier stage (its config is inherited)
    preset: str = "tiny"  # used when init_from is empty
    tokenizer: str = ""  # tokenizer directory when init_from is empty
    dropout: float = 0.0
    # optimisation
    seq_len: int = 512
    batch_size: int = 16  # rows per micro-batch per process
    group_by_length: bool = True  # put rows of similar length in the same step (less padding; SFT, DPO)
    global_batch_tokens: int = 0  # tokens per optimizer step over all processes (0: batch_size * seq_len * world)
    steps: int = 0  # optimizer steps (0: derived from epochs)
    epochs: float = 1.0
    time_budget: float = 0.0  # seconds: if set, the run shortens itself to fit (measured after 4 steps)
    lr: float = 5e-4
    # adamw, or muon: Muon on the hidden 2-D matrices (attention, MLP, MoE experts, LoRA adapters), AdamW on the
    # rest (embeddings, tied head, norms, MoE routers)
    optimizer: str = "adamw"
    muon_lr: float = 0.0  # Muon's peak rate (0: lr; Muon's update is scaled to AdamW's RMS, so lr carries over)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0  # 0: 2% of the steps
    weight_decay: float = 0.1  # matrices only; norms and embeddings are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # machine
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (bf16 where the hardware has it), bfloat16, float16, float32
    compile: bool = False
    seed: int = 42
    threads: int = 0  # CPU threads per process (0: torch's default)
    # bookkeeping
    log_every: int = 10
    eval_every: int = 0  # full validation every N steps (0: only at the end, plus `evals` cheap curve points)
    evals: int = 6  # with eval_every = 0: validation-curve points per run, each on the first eval_batches // 5
    eval_batches: int = 20  # a full validation reads the first eval_batches x batch_size rows
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_last: int = 2
    resume: bool = False
    loggers: list[str] = field(default_factory=list)  # tensorboard, wandb, swanlab (when installed)
    progress: bool = True
    # ---- stage-specific settings (each stage reads only its own block) ----
    # lora
    lora_rank: int = 16  # r: rank of the adapter matrices (MiniMind: 16)
    lora_alpha: float = 32.0  # scaling = alpha / rank (MiniMind has no scaling: alpha = rank)
    lora_dropout: float = 0.0  # dropout on the adapter's input while training
    lora_targets: str = "all"  # all (q,k,v,o,gate,up,down), qo (MiniMind's), or names: q_proj,v_proj
    # dpo
    dpo_beta: float = 0.15  # DPO: strength of the implicit KL to the reference (MiniMind: 0.15)
    dpo_label_smoothing: float = 0.0  # DPO: assumed share of flipped preferences (conservative DPO); 0 = plain DPO
    dpo_nll_weight: float = 0.0  # DPO: plus this times the chosen reply's per-token NLL (as RPO), so the
    # policy keeps the chosen replies likely instead of only pushing the rejected ones down; 0 = plain DPO
    ref_model: str = ""  # DPO: reference model directory (default: a frozen copy of the starting policy)
    # distill
    teacher: str = ""  # distill: teacher model directory (same tokenizer as the student)
    kd_alpha: float = 0.5  # distill: loss = (1 - kd_alpha) * CE + kd_alpha * T^2 * KL (MiniMind: 0.5)
    kd_temperature: float = 1.5  # distill: softmax temperature T of both models for the KL term (MiniMind: 1.5)
    kd_reverse: bool = False  # distill: KL(student || teacher) instead of the default KL(teacher || student)
    # rl (ppo, grpo, agent)
    num_generations: int = 6  # GRPO/agent: samples per prompt (the group); PPO samples 1 (MiniMind: 6; agent 4)
    max_gen_len: int = 1024  # new tokens per sample (agent: per turn); prompts are cut to seq_len (MiniMind: 1024)
    rollout_temperature: float = 0.8  # sampling temperature of the rollouts (MiniMind: 0.8, fixed)
    rollout_top_p: float = 1.0  # nucleus sampling of the rollouts (1: off)
    thinking_ratio: float = 0.9  # share of prompts opened with <think> (task rows follow their family) (MiniMind: 0.9)
    loss_type: str = "cispo"  # grpo (clipped ratio) or cispo (clipped, detached IS weight); MiniMind's default is cispo
    loss_agg: str = "sequence"  # sequence: mean over each sample's tokens, then over samples (MiniMind); or token
    kl_coef: float = 0.1  # KL-to-reference weight (k3); 0: no reference (MiniMind: GRPO --beta 0.1, PPO 0.02)
    epsilon: float = 0.2  # clip range of the importance ratio (GRPO, PPO) (MiniMind: 0.2)
    epsilon_high: float = 5.0  # CISPO: cap on the detached importance weight (MiniMind: 5.0)
    update_epochs: int = 1  # optimizer steps taken on each rollout batch (MiniMind: GRPO 1, PPO 2)
    rewards: str = "answer:1,format:0.2,repetition:0.5"  # reward parts and weights (see minimind.rl.rewards)
    reward_model: str = ""  # optional reward-model directory (minimind train reward); scored with rewards' "rm"
    vf_coef: float = 0.5  # PPO: weight of the value loss (MiniMind: 0.5)
    cliprange_value: float = 0.2  # PPO: clip range of the value update (MiniMind: 0.2)
    gamma: float = 1.0  # PPO: discount (MiniMind: 1.0)
    lam: float = 0.95  # PPO: GAE lambda (MiniMind: 0.95)
    max_turns: int = 3  # agent: assistant turns per trajectory (MiniMind: 3, fixed)
    max_total_len: int = 2500  # agent: trajectory tokens, prompt included (MiniMind: 2500)
    tools: list[str] = field(default_factory=list)  # agent: tools offered when a row names none (default: all)
    rollout_every: int = 10  # write sampled rollouts to <run>/rollouts.jsonl every N steps (0: never)
    # vision (vision-pretrain, vision-sft): MiniMind-V's --freeze_llm: 2 trains the projector only, 1 also the
    # decoder's first and last layers, 0 the whole decoder; -1: the stage's MiniMind-V default (pretrain 2, sft 1)
    freeze_llm: int = -1
    vision_encoder: str = ""  # a transformers SigLIP / CLIP tower directory for a new VLM ("": the tiny tower)
    train_encoder: bool = False  # train the tower too (the tiny one learns from scratch; MiniMind-V: frozen)
    vision_lr: float = 0.0  # peak rate of the tower and projector (0: lr): new weights want more than the decoder

    def __post_init__(self) -> None:
        if not self.out:
            self.out = f"runs/{self.stage}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out)


def _coerce(name: str, kind: Any, value: Any, source: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise MiniMindError(f"{source}: {name} must be a list")
        return [str(v).strip() for v in items if str(v).strip()]
    if isinstance(kind, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise MiniMindError(f"{source}: {name} must be true or false, not {value!r}")
    try:
        if kind is int and isinstance(value, str):
            return int(float(value)) if "e" in value.lower() else int(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise MiniMindError(f"{source}: {name} must be {kind.__name__}, not {value!r}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **fixed: Any) -> TrainConfig:
    """Settings from a TOML file (flat keys, or grouped in tables whose names are ignored), then
    `--key value` overrides (dashes or underscores; `--flag` / `--no-flag` for booleans), then `fixed`.
    Unknown keys are errors."""
    hints = typing.get_type_hints(TrainConfig)
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise MiniMindError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise MiniMindError(f"{path}: invalid TOML ({e})") from None
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        for key, value in flat.items():
            if key not in hints:
                raise MiniMindError(f"{path}: unknown setting {key!r}")
            values[key] = _coerce(key, hints[key], value, str(path))
    args = list(overrides or [])
    while args:
        flag = args.pop(0)
        if not flag.startswith("--"):
            raise MiniMindError(f"expected --key value, got {flag!r}")
        key, eq, value = flag[2:].partition("=")  # dashes become underscores in the name, not in the value
        key = key.replace("-", "_")
        if not eq:
            if key.startswith("no_") and hints.get(key[3:]) is bool:  # --no-progress, --no-compile
                key, value = key[3:], "false"
            elif args and not args[0].startswith("--"):
                value = args.pop(0)
            elif key in hints and hints[key] is bool:
                value = "true"
            else:
                raise MiniMindError(f"--{key} needs a value")
        if key not in hints:
            close = [k for k in hints if k.startswith(key[:3])]
            raise MiniMindError(f"unknown setting --{key}" + (f" (did you mean --{close[0]}?)" if close else ""))
        values[key] = _coerce(key, hints[key], value, f"--{key}")
    values.update(fixed)
    return TrainConfig(**values)


def to_toml(cfg: TrainConfig) -> str:
    """The resolved settings, written into the run directory so a run can be repeated exactly."""
    lines = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, bool):
            text = "true" if v else "false"
        elif isinstance(v, (int, float)):
            text = repr(v)
        elif isinstance(v, list):
            text = "[" + ", ".join(f'"{x}"' for x in v) + "]"
        else:
            text = '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{f.name} = {text}")
    return "\n".join(lines) + "\n"
