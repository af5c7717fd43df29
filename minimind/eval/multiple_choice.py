"""Multiple-choice evaluation (C-Eval / CMMLU / MMLU CSV files, ARC-style JSONL) scored by log-likelihood: each
option's summed token log-probability given the prompt, or the answer letter after the listed options.
`result = evaluate_mc(model, tok, read_mc("mmlu/"), few_shot=5)`; CLI: `minimind eval --task mc --data DIR`."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minimind import MiniMindError
from minimind.logprobs import response_logps
from minimind.model import MiniMindForCausalLM

LETTERS = "ABCDEFGHIJ"
MODES = ("loglik", "letter")
SPLIT_SUFFIXES = ("_val", "_test", "_dev", "_train", "_validation")  # C-Eval/MMLU file names: {subject}_{split}.csv


@dataclass
class MCItem:
    question: str
    choices: list[str]
    answer: int  # index into choices
    subject: str = ""
    where: str = ""  # file:line, for messages


# ---------------------------------------------------------------------------------------------- reading


def _subject(path: Path) -> str:
    stem = path.stem
    for suffix in SPLIT_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem


def _answer_index(value: object, labels: Sequence[str], where: str) -> int:
    text = str(value).strip()
    if text in labels:
        return list(labels).index(text)
    if text.upper() in labels:
        return list(labels).index(text.upper())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    raise MiniMindError(f"{where}: answer {text!r} is not one of {', '.join(labels)}")


def _read_csv(path: Path) -> list[MCItem]:
    """C-Eval (id,question,A,B,C,D,answer[,explanation]), CMMLU (,Question,A,B,C,D,Answer) or MMLU (no header:
    question,A,B,C,D,answer)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
    except (UnicodeDecodeError, csv.Error) as e:
        raise MiniMindError(f"{path}: unreadable CSV ({e})") from None
    if not rows:
        return []
    head = [c.strip().lower() for c in rows[0]]
    if "question" in head and "answer" in head:
        q, a = head.index("question"), head.index("answer")
        options = [i for i, c in enumerate(head) if len(c) == 1 and c.upper() in LETTERS]
        body, first = rows[1:], 2
    else:
        if len(rows[0]) < 4:
            raise MiniMindError(f"{path}:1: expected question, options and answer columns (MMLU layout)")
        q, a, options = 0, len(rows[0]) - 1, list(range(1, len(rows[0]) - 1))
        body, first = rows, 1
    if len(options) < 2:
        raise MiniMindError(f"{path}:1: expected option columns A, B, ... in the header")
    labels = LETTERS[:len(options)]
    items = []
    for line, row in enumerate(body, first):
        if not any(c.strip() for c in row):
            continue
        where = f"{path}:{line}"
        if len(row) <= max(q, a, *options):
            raise MiniMindError(f"{where}: expected {max(q, a, *options) + 1} columns, found {len(row)}")
        items.append(MCItem(row[q], [row[i] for i in options], _answer_index(row[a], labels, where),
                            _subject(path), where))
    return items


def _read_jsonl(path: Path) -> list[MCItem]:
    """ARC ({"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}), its flattened Hugging Face form
    ({"question", "choices": {"text": [...], "label": [...]}, "answerKey"}), or {"question", "choices": [...],
    "answer": index or letter}; an optional "subject"."""
    items = []
    with path.open(encoding="utf-8") as fh:
        for line, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line}"
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise MiniMindError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise MiniMindError(f"{where}: expected a JSON object")
            question, choices = row.get("question"), row.get("choices")
            if isinstance(question, dict):
                question, choices = question.get("stem"), question.get("choices")
            if isinstance(choices, dict):
                texts, labels = choices.get("text"), choices.get("label")
            elif isinstance(choices, list) and choices and all(isinstance(c, dict) for c in choices):
                texts, labels = [c.get("text") for c in choices], [str(c.get("label")) for c in choices]
            elif isinstance(choices, list):
                texts, labels = choices, list(LETTERS[:len(choices)])
            else:
                texts, labels = None, None
            if not isinstance(question, str) or not isinstance(texts, list) or not 2 <= len(texts) <= len(LETTERS) \
                    or not all(isinstance(t, str) for t in texts):
                raise MiniMindError(f"{where}: expected a question and a list of 2 to {len(LETTERS)} text choices")
            labels = [str(x) for x in labels or LETTERS[:len(texts)]]
            key = next((k for k in ("answerKey", "answer", "label") if k in row), None)
            if key is None:
                raise MiniMindError(f"{where}: no answer (answerKey or answer)")
            items.append(MCItem(question, list(texts), _answer_index(row[key], labels, where),
                                str(row.get("subject") or _subject(path)), where))
    return items


def read_mc(path: str | Path) -> list[MCItem]:
    """Items of a .csv or .jsonl file, or of every such file under a directory (one subject per file)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".csv", ".jsonl") and p.is_file())
        if not files:
            raise MiniMindError(f"{path}: no .csv or .jsonl files")
    elif path.is_file():
        files = [path]
    else:
        raise MiniMindError(f"{path}: no such file or directory")
    items: list[MCItem] = []
    for f in files:
        if f.suffix.lower() == ".csv":
            items += _read_csv(f)
        elif f.suffix.lower() == ".jsonl":
            items += _read_jsonl(f)
        else:
            raise MiniMindError(f"{f}: expected a .csv (C-Eval/CMMLU/MMLU) or .jsonl (ARC) file")
    if not items:
        raise MiniMindError(f"{path}: no questions")
    return items


# ---------------------------------------------------------------------------------------------- prompts


def _is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def question_text(item: MCItem, with_options: bool) -> str:
    text = item.question.strip()
    if with_options:
        text += "".join(f"\n{LETTERS[i]}. {c.strip()}" for i, c in enumerate(item.choices))
    return text + ("\n答案：" if _is_chinese(item.question) else "\nAnswer:")


def shots_for(items: Sequence[MCItem], k: int) -> list[list[MCItem]]:
    """For each item, the k items of its subject that precede it (wrapping round), never itself: every item is
    scored, none sees its own answer."""
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_subject[item.subject].append(i)
    out: list[list[MCItem]] = [[] for _ in items]
    for members in by_subject.values():
        for pos, i in enumerate(members):
            n = min(k, len(members) - 1)
            out[i] = [items[members[(pos - n + j) % len(members)]] for j in range(n)]
    return out


def requests_for(item: MCItem, shots: Sequence[MCItem], mode: str) -> list[tuple[str, str]]:
    """(context, continuation) per option. loglik: continuation = " " + option text; letter: the options are
    listed and the continuation is " A", " B", ..."""
    letter = mode == "letter"
    answer = (lambda it, i: LETTERS[i]) if letter else (lambda it, i: it.choices[i].strip())
    parts = [f"{question_text(s, letter)} {answer(s, s.answer)}" for s in shots]
    context = "\n\n".join(parts + [question_text(item, letter)])
    return [(context, " " + answer(item, i)) for i in range(len(item.choices))]


# ---------------------------------------------------------------------------------------------- scoring


@torch.inference_mode()
def loglikelihoods(model: MiniMindForCausalLM, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                   progress: bool = False) -> list[tuple[float, int]]:
    """(sum of log p(continuation tokens | context), number of continuation tokens) for each request. The
    context starts with `<|im_start|>` as in pretraining; too long a context loses its oldest tokens."""
    from tqdm import tqdm

    limit = model.config.max_position_embeddings
    device = model.model.embed_tokens.weight.device
    encoded = []
    for context, continuation in requests:
        ctx = [model.config.bos_token_id] + tokenizer.encode(context, add_special_tokens=False)
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        if not cont or len(cont) >= limit:
            raise MiniMindError(f"option {continuation.strip()[:40]!r} has {len(cont)} tokens; it must have 1 to "
                                f"{limit - 1} (the model's context)")
        ids = (ctx + cont)[-limit:]
        encoded.append((ids, len(ids) - len(cont)))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # similar lengths share a batch
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    bar = tqdm(total=len(order), desc="scoring", unit=" options", disable=not progress, leave=False)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo:lo + batch_size]
        width = max(len(encoded[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), model.config.pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, i in enumerate(chunk):
            seq, start = encoded[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, start:len(seq)] = ids[row, start:len(seq)]
        # Right padding needs no mask: causal attention never lets a real token see the padding after it.
        logp = response_logps(model(ids.to(device)).logits, labels.to(device)).tolist()
        for row, i in enumerate(chunk):
            out[i] = (logp[row], len(encoded[i][0]) - encoded[i][1])
        bar.update(len(chunk))
    bar.close()
    return out


@dataclass
class MCResult:
    mode: str = "loglik"
    total: int = 0
    correct: int = 0
    correct_norm: int = 0  # by log-likelihood per UTF-8 byte of the option (lm-eval's acc_norm)
    by_subject: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))
    samples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    @property
    def accuracy_norm(self) -> float:
        return self.correct_norm / max(self.total, 1)

    def subject_accuracy(self) -> dict[str, dict[str, float]]:
        return {s: {"n": n, "accuracy": c / max(n, 1), "accuracy_norm": cn / max(n, 1)}
                for s, (c, cn, n) in sorted(self.by_subject.items())}

    @property
    def macro_accuracy(self) -> float:
        """The mean of the per-subject accuracies (C-Eval and MMLU report this average too)."""
        subjects = self.subject_accuracy()
        return sum(s["accuracy"] for s in subjects.values()) / max(len(subjects), 1)


def evaluate_mc(model: MiniMindForCausalLM, tokenizer, items: Sequence[MCItem], few_shot: int = 0,
                mode: str = "loglik", limit: int | None = None, batch_size: int = 16, progress: bool = False,
                shot_pool: Sequence[MCItem] | None = None) -> MCResult:
    """Score every item (or `limit` of them, taken round-robin over subjects); `few_shot` examples come from the
    same subject of `shot_pool` (default: the items themselves, never the item being asked)."""
    if mode not in MODES:
        raise MiniMindError(f"unknown multiple-choice mode {mode!r}; choose {' or '.join(MODES)}")
    items = list(items)
    if shot_pool is None:
        shots = shots_for(items, few_shot)
    else:
        by_subject: dict[str, list[MCItem]] = defaultdict(list)
        for s in shot_pool:
            by_subject[s.subject].append(s)
        shots = [by_subject.get(it.subject, [])[:few_shot] for it in items]
    chosen = list(range(len(items)))
    if limit is not None and limit < len(items):
        rank: dict[str, int] = defaultdict(int)
        keyed = []
        for i, it in enumerate(items):
            keyed.append((rank[it.subject], i))
            rank[it.subject] += 1
        chosen = sorted(i for _, i in sorted(keyed)[:limit])
    requests, owner = [], []
    for i in chosen:
        for r in requests_for(items[i], shots[i], mode):
            requests.append(r)
            owner.append(i)
    scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    per_item: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for i, (_, continuation), (ll, _) in zip(owner, requests, scores):
        per_item[i].append((ll, ll / max(len(continuation.strip().encode("utf-8")), 1)))
    result = MCResult(mode=mode)
    for i in chosen:
        item, lls = items[i], per_item[i]
        pred = max(range(len(lls)), key=lambda c: lls[c][0])
        pred_norm = max(range(len(lls)), key=lambda c: lls[c][1]) if mode == "loglik" else pred
        ok, ok_norm = pred == item.answer, pred_norm == item.answer
        result.total += 1
        result.correct += ok
        result.correct_norm += ok_norm
        counts = result.by_subject[item.subject]
        counts[0] += ok
        counts[1] += ok_norm
        counts[2] += 1
        if len(result.samples) < 200:
            result.samples.append({"where": item.where, "subject": item.subject, "answer": LETTERS[item.answer],
                                   "predicted": LETTERS[pred], "loglik": [round(x[0], 4) for x in lls]})
    return result
