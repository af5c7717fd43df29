"""Knowledge distillation. White-box: the student learns from a teacher's logits (CE + temperature-scaled KL on
the assistant tokens): `minimind train distill --config configs/distill.toml`. Black-box: the teacher answers
prompts into an SFT file: `minimind data distill --teacher DIR --prompts rl.jsonl --out distill.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minimind import MiniMindError
from minimind.chat import encode_chat, parse_assistant
from minimind.checkpoint import load_model
from minimind.data.formats import BadLine, iter_rows, parse_row
from minimind.files import atomic_path
from minimind.generation import SamplingParams, generate
from minimind.logprobs import cross_entropy_sum
from minimind.tokenizer import load_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.sft import SFTStage
from minimind.train.stage import Dist

# ---------------------------------------------------------------------------------------------- white-box


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
          reverse: bool = False) -> torch.Tensor:
    """Per position, KL(teacher || student) of the temperature-softened distributions ([N, V] -> [N]);
    reverse=True gives KL(student || teacher), which is mode-seeking rather than mass-covering."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if reverse:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def same_vocab(student_tokenizer, teacher_dir: str) -> None:
    """Raise MiniMindError unless the teacher directory's tokenizer maps every token to the same id."""
    if not (Path(teacher_dir) / "tokenizer.json").is_file():
        return  # a bare weights directory: only the vocab sizes can be compared (setup does)
    theirs, ours = load_tokenizer(teacher_dir).get_vocab(), student_tokenizer.get_vocab()
    if theirs != ours:
        differ = len(set(theirs.items()) ^ set(ours.items()))
        raise MiniMindError(f"{teacher_dir}: the teacher's tokenizer differs from the student's ({len(theirs):,} vs "
                            f"{len(ours):,} tokens, {differ:,} token/id entries differ); white-box distillation "
                            "compares logits token by token, so both must use the same tokenizer (black-box "
                            "distillation, `minimind data distill`, has no such need)")


class DistillStage(SFTStage):
    """SFT data and batches; loss = (1 - kd_alpha) * CE + kd_alpha * T^2 * KL on the assistant tokens, summed
    (the loop divides by the target-token count)."""

    def __init__(self, cfg: TrainConfig, tokenizer, dist: Dist | None = None) -> None:
        super().__init__(cfg, tokenizer, dist)
        if not cfg.teacher:
            raise MiniMindError("distill needs a teacher: set teacher = \"runs/<name>/model\" or pass --teacher DIR")
        if not 0 <= cfg.kd_alpha <= 1:
            raise MiniMindError(f"kd_alpha must be in [0, 1], got {cfg.kd_alpha}")
        if cfg.kd_temperature <= 0:
            raise MiniMindError(f"kd_temperature must be > 0, got {cfg.kd_temperature}")
        self.teacher: torch.nn.Module | None = None
        self.vocab = 0

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        same_vocab(self.tokenizer, self.cfg.teacher)
        teacher = load_model(self.cfg.teacher, device=device)
        if teacher.config.vocab_size < len(self.tokenizer) or model.config.vocab_size < len(self.tokenizer):
            raise MiniMindError(f"{self.cfg.teacher}: teacher vocab_size {teacher.config.vocab_size} and student "
                                f"vocab_size {model.config.vocab_size} must both cover the tokenizer's "
                                f"{len(self.tokenizer)} tokens")
        # Rows past the tokenizer (padding a vocab to a round size) are never targets: compare the real tokens.
        self.vocab = len(self.tokenizer)
        self.teacher = teacher.eval().requires_grad_(False)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        if self.teacher is None:
            raise MiniMindError("DistillStage.setup(model, device) must run before loss (it loads the teacher)")
        ids = batch["input_ids"]
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        out = model(ids)
        student = out.logits[:, :-1][keep]
        with torch.no_grad():
            teacher = self.teacher(ids).logits[:, :-1][keep]
        ce = cross_entropy_sum(student, labels[keep])
        kl = kd_kl(student[:, :self.vocab], teacher[:, :self.vocab], self.cfg.kd_temperature,
                   self.cfg.kd_reverse).sum()
        alpha, t = self.cfg.kd_alpha, self.cfg.kd_temperature
        n = int(keep.sum())
        extras = {"ce": ce.detach() / max(n, 1), "kl": kl.detach() / max(n, 1)}
        if out.aux_loss is not None:
            extras["aux_loss"] = out.aux_loss
        return (1 - alpha) * ce + alpha * t * t * kl, n, extras


# ---------------------------------------------------------------------------------------------- black-box


def distill_file(teacher_dir: str | Path, prompts_path: str | Path, out_path: str | Path, *, batch_size: int = 16,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 enable_thinking: bool = False, keep_truncated: bool = False, limit: int = 0, device: str = "auto",
                 dtype: str = "auto", skip_bad: bool = False, progress: bool = True) -> dict[str, int]:
    """Generate the teacher's answers to RL-format prompts (conversations ending with a user turn), batched,
    and write them as SFT rows (reasoning and tool calls parsed out) to `out_path`, atomically.

    Prompts are decoded in batches of similar length. Dropped and counted: prompts that leave no room for
    max_new_tokens in the teacher's context ("too_long"), answers cut off by max_new_tokens ("truncated",
    unless keep_truncated: a student trained on them would not learn to stop) and empty answers ("empty").
    Returns those counts and "written"."""
    from minimind.device import pick_device, pick_dtype

    dev = pick_device(device)
    model = load_model(teacher_dir, device=dev, dtype=pick_dtype(dtype, dev))
    tokenizer = load_tokenizer(teacher_dir)
    bad: list[BadLine] | None = [] if skip_bad else None
    rows = []
    for _, row in iter_rows(prompts_path, "rl", bad):
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    counts = {"prompts": len(rows), "written": 0, "too_long": 0, "truncated": 0, "empty": 0,
              "skipped_bad": len(bad or [])}
    room = model.config.max_position_embeddings - max_new_tokens
    prompts: list[tuple[int, list[int]]] = []
    for i, row in enumerate(rows):
        ids, _ = encode_chat(tokenizer, row["messages"], row["tools"], add_generation_prompt=True,
                             enable_thinking=enable_thinking)
        if len(ids) > room:
            counts["too_long"] += 1
        else:
            prompts.append((i, ids))
    prompts.sort(key=lambda p: len(p[1]))  # similar lengths together: less left padding per batch
    answers: dict[int, dict] = {}
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed)
    for lo in tqdm(range(0, len(prompts), batch_size), desc="teacher answers", unit="batch", disable=not progress):
        chunk = prompts[lo:lo + batch_size]
        for (i, _), done in zip(chunk, generate(model, tokenizer, [ids for _, ids in chunk], params)):
            if done.finish_reason == "length" and not keep_truncated:
                counts["truncated"] += 1
                continue
            # With thinking on, the prompt opened <think>: the text starts inside the reasoning.
            parsed = parse_assistant(("<think>\n" if enable_thinking else "") + done.text)
            reply = {"role": "assistant", "content": parsed["content"]}
            if parsed["reasoning_content"]:
                reply["reasoning_content"] = parsed["reasoning_content"]
            if parsed["tool_calls"]:
                reply["tool_calls"] = parsed["tool_calls"]
            out = {"conversations": [*rows[i]["messages"], reply]}
            if rows[i]["tools"]:
                out["tools"] = rows[i]["tools"]
            try:
                parse_row(out, "sft")
            except ValueError:
                counts["empty"] += 1  # the teacher stopped at once: nothing to learn from
                continue
            answers[i] = out
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i in sorted(answers):  # the prompts' order, not the batching order
            f.write(json.dumps(answers[i], ensure_ascii=False) + "\n")
    counts["written"] = len(answers)
    return counts
