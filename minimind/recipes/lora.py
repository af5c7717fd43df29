"""The LoRA recipe behind the demo's side-by-side: an adapter that gives the model a new identity, and the base
model's greedy replies next to the adapted one's. `rows = lora_example("runs/demo/sft/model", "runs/demo/lora")`."""

from __future__ import annotations

import json
import random
from pathlib import Path

from minimind.chat import encode_chat
from minimind.checkpoint import load_model
from minimind.data.tasks import GENERATORS
from minimind.generation import SamplingParams, generate
from minimind.lora import load_adapter
from minimind.tokenizer import load_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.loop import train
from minimind.train.lora import LoRAStage, adapter_dir

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
