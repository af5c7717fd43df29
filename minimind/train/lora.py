"""LoRA fine-tuning: SFT data and loss, but only low-rank adapters train; writes runs/<name>/adapter (PEFT
layout). `minimind train lora --config configs/lora.toml`; the built-in example is `lora_example(base, out)`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from minimind import MiniMindError
from minimind.lora import freeze_base, inject_lora, load_adapter, save_adapter
from minimind.train.config import TrainConfig
from minimind.train.sft import SFTStage


def adapter_dir(cfg: TrainConfig) -> Path:
    """Where a LoRA run writes its adapter: runs/<name>/adapter."""
    return cfg.run_dir / "adapter"


class LoRAStage(SFTStage):
    """SFT with a frozen base. setup() runs before the optimizer is built and before a resume state is
    loaded, so the optimizer sees only the adapters and the checkpoint (base + adapters) loads by name."""

    output = "adapter"  # the run's product is runs/<name>/adapter, not a model directory

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        cfg = self.cfg
        if not cfg.init_from:
            raise MiniMindError("LoRA adapts an existing model: set init_from (a model directory, e.g. "
                                "runs/sft/model)")
        names = inject_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        trainable, total = freeze_base(model)
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        self.say(f"LoRA: rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on {len(names)} layers "
                 f"({', '.join(kinds)}): {trainable:,} trainable parameters, {100 * trainable / total:.2f}% of "
                 f"{total:,}")

    def save(self, model: torch.nn.Module, out: Path, tokenizer=None) -> Path:
        """The adapter only (runs/<name>/adapter), not a model directory: merge it with `minimind lora merge`."""
        return save_adapter(model, adapter_dir(self.cfg), base_model_dir=self.cfg.init_from)


# ---- built-in example: a new identity ------------------------------------------------------------------

REPLIES = {
    "en": ("I am {name}, a small model adapted with LoRA.",
           "My name is {name}. I am a small language model adapted with LoRA.",
           "I am {name}, a small model adapted with LoRA. How can I help?"),
    "zh": ("我是 {name}，一个用 LoRA 微调过的小模型。",
           "我叫 {name}，是一个经过 LoRA 适配的小型语言模型。",
           "我是 {name}，一个用 LoRA 微调过的小模型。有什么可以帮你？"),
}
QUESTIONS = ("Who are you?", "你是谁？", "What is your name?", "介绍一下你自己。", "What is 12 + 7?")


def identity_rows(n: int, seed: int = 0, name: str = "LoRA-Mind") -> list[dict]:
    """`n` SFT rows (half English, half Chinese) in which the assistant introduces itself as `name`. The
    questions are the built-in identity task's (minimind.data.tasks), so only the answer changes."""
    from minimind.data.tasks import GENERATORS

    rng = random.Random(f"minimind-lora-identity/{seed}")
    rows = []
    for i in range(n):
        lang = "en" if i % 2 == 0 else "zh"
        question = GENERATORS["identity"](rng, lang).question
        reply = rng.choice(REPLIES[lang]).format(name=name)
        rows.append({"conversations": [{"role": "user", "content": question},
                                       {"role": "assistant", "content": reply}], "answer": name})
    return rows


def _greedy_replies(model, tokenizer, questions, max_new_tokens: int) -> list[str]:
    from minimind.chat import encode_chat
    from minimind.generation import SamplingParams, generate

    prompts = [encode_chat(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for q in questions]
    done = generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    return [c.text.strip() for c in done]


def lora_example(base_dir: str | Path, out_dir: str | Path, name: str = "LoRA-Mind", rows: int = 400,
                 steps: int = 100, rank: int = 8, alpha: float = 16.0, lr: float = 1e-2, targets: str = "all",
                 questions: tuple[str, ...] = QUESTIONS, max_new_tokens: int = 40, progress: bool = False,
                 **train_overrides) -> list[tuple[str, str, str]]:
    """Train an identity adapter on `base_dir` (a chat model directory) into `out_dir` (a run directory:
    identity.jsonl, adapter/, metrics.jsonl, ...) and return (question, base reply, adapted reply) per
    question, decoded greedily."""
    from minimind.checkpoint import load_model
    from minimind.tokenizer import load_tokenizer
    from minimind.train.loop import train

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "identity.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in identity_rows(rows, name=name)),
                    encoding="utf-8")
    settings = dict(stage="lora", out=str(out_dir), data=str(data), init_from=str(base_dir), steps=steps,
                    lora_rank=rank, lora_alpha=alpha, lora_targets=targets, lr=lr, warmup_steps=0, seq_len=128,
                    batch_size=16, weight_decay=0.0, workers=1, progress=progress, log_every=10, keep_last=1)
    settings.update(train_overrides)
    cfg = TrainConfig(**settings)
    train(cfg, LoRAStage)

    tokenizer = load_tokenizer(base_dir)
    base = load_model(base_dir)
    adapted = load_adapter(load_model(base_dir), adapter_dir(cfg))
    before = _greedy_replies(base, tokenizer, questions, max_new_tokens)
    after = _greedy_replies(adapted, tokenizer, questions, max_new_tokens)
    return list(zip(questions, before, after))


def side_by_side_markdown(rows: list[tuple[str, str, str]]) -> str:
    """The example's result as a markdown table (question | base | with the adapter)."""
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| question | base model | with the LoRA adapter |", "|---|---|---|"]
    lines += [f"| {cell(q)} | {cell(b)} | {cell(a)} |" for q, b, a in rows]
    return "\n".join(lines)
