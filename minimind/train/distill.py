"""Knowledge distillation. White-box: the student learns from a teacher's logits (CE + temperature-scaled KL on
the assistant tokens): `minimind train distill --config configs/distill.toml`. Black-box: the teacher answers
prompts into an SFT file: `minimind data distill --teacher DIR --prompts rl.jsonl --out distill.jsonl`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minimind import MiniMindError
from minimind.chat import encode_chat, parse_assistant
from minimind.checkpoint import atomic_path, load_model
from minimind.data.formats import BadLine, iter_rows, parse_row
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


@torch.no_grad()
def heldout_kl(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer, path: str | Path, seq_len: int = 512,
               rows: int = 64) -> float:
    """Mean KL(teacher || student) per assistant token (T = 1) over the first `rows` conversations of an SFT
    file: how close distillation has brought the student."""
    from minimind.chat import encode_chat
    from minimind.data.formats import iter_rows

    device = next(student.parameters()).device
    total, count = 0.0, 0
    for i, (_, row) in enumerate(iter_rows(path, "sft")):
        if i == rows:
            break
        ids, mask = encode_chat(tokenizer, row["messages"], row["tools"])
        ids, mask = torch.tensor([ids[:seq_len]], device=device), torch.tensor(mask[:seq_len], device=device)
        keep = mask[1:].bool()
        kl = kd_kl(student(ids).logits[0, :-1][keep], teacher(ids).logits[0, :-1][keep], 1.0)
        total, count = total + float(kl.sum()), count + int(keep.sum())
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------- black-box


def distill_file(teacher_dir: str | Path, prompts_path: str | Path, out_path: str | Path, *, batch_size: int = 16,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
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
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
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


def cmd_distill(args: argparse.Namespace) -> None:
    counts = distill_file(args.teacher, args.prompts, args.out, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, enable_thinking=args.think, keep_truncated=args.keep_truncated,
                          limit=args.limit, device=args.device, dtype=args.dtype, skip_bad=args.skip_bad,
                          progress=sys.stderr.isatty())
    dropped = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in counts.items()
                        if k not in ("prompts", "written") and v)
    print(f"wrote {counts['written']:,} of {counts['prompts']:,} teacher answers to {args.out}"
          + (f" (dropped: {dropped})" if dropped else ""))


def add_distill_parser(data: argparse._SubParsersAction) -> None:
    """`minimind data distill`: black-box distillation data (the teacher's answers as an SFT file)."""
    p = data.add_parser("distill", help="generate a teacher model's answers to prompts as an SFT file",
                        description="Black-box distillation: the teacher answers each prompt (RL format: a "
                        "conversation ending with a user turn); the answers are written as SFT rows to train "
                        "a student with `minimind train sft`.")
    p.add_argument("--teacher", required=True, help="teacher model directory (with its tokenizer)")
    p.add_argument("--prompts", required=True, help="prompts .jsonl (conversations ending with a user turn)")
    p.add_argument("--out", required=True, help="output SFT .jsonl (written atomically)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer; longer ones are dropped")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the teacher's most likely answer)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when temperature > 0 (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--think", action="store_true", help="let the teacher think first; keeps its reasoning_content")
    p.add_argument("--keep-truncated", action="store_true", help="keep answers cut off by --max-new-tokens")
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0 = all)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad prompt lines instead of failing")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="teacher weights dtype")
    p.set_defaults(func=cmd_distill)
