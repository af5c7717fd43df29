"""Multiple-choice evaluation (MMLU, C-Eval, CMMLU, ARC: their CSV files and the Hugging Face hub's CSV, JSONL
and Parquet layouts) scored by log-likelihood: each option's summed token log-probability given the prompt, or
the answer letter after the listed options. Reports lm-eval's `acc`, `acc_norm` (per character) and `acc_bytes`.
`result = evaluate_mc(model, tok, read_mc("mmlu/"), few_shot=5)`; CLI: `minimind eval --task mc --data DIR`."""

from __future__ import annotations

import ast
import csv
import glob
import io
import json
import re
import tokenize
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minimind import MiniMindError
from minimind.logprobs import token_nll
from minimind.model import MiniMindForCausalLM

LETTERS = "ABCDEFGHIJ"
MODES = ("loglik", "letter")
SUFFIXES = (".csv", ".jsonl", ".parquet")
SPLIT_SUFFIXES = ("_val", "_test", "_dev", "_train", "_validation")  # C-Eval/MMLU file names: {subject}_{split}.csv
SPLITS = ("train", "test", "dev", "val", "validation", "auxiliary_train")
# The hub names files by split or shard (abstract_algebra/test-00000-of-00001.parquet, agronomy/test/0000.parquet).
SHARD = re.compile(r"^((train|test|dev|val|validation)-)?\d{4,5}(-of-\d{4,5})?$")
ANSWER_KEYS = ("answerkey", "answer", "label")
NO_ANSWERS = "this file has no answers (C-Eval's test split keeps them private: evaluate its val split)"


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
    if stem.lower() in SPLITS or SHARD.match(stem.lower()):  # the nearest folder that is not a split names it
        return next((p.name for p in path.parents if p.name and p.name.lower() not in SPLITS), stem)
    return stem


def _answer_index(value: object, labels: Sequence[str], where: str) -> int:
    text = str(value).strip()
    if text in labels:
        return list(labels).index(text)
    if text.upper() in labels:
        return list(labels).index(text.upper())
    # The hub's MMLU writes the answer as a 0-based index (an int, or digits in a CSV).
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    if text.isdigit() and labels[0] == "A" and int(text) < len(labels):
        return int(text)
    raise MiniMindError(f"{where}: answer {text!r} is not one of {', '.join(labels)} (or 0 to {len(labels) - 1})")


def _list_cell(text: str, where: str) -> list:
    """A list that a CSV export wrote into one cell: JSON, Python's repr, or numpy's (`['a' 'b' 'c']`, no commas,
    which pandas writes for the hub's `choices`)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text.strip()).readline))
    except (tokenize.TokenError, SyntaxError) as e:
        raise MiniMindError(f"{where}: field 'choices' is not a list ({e})") from None
    strings, stray = [], []
    for t in tokens:
        if t.type == tokenize.STRING:
            strings.append(ast.literal_eval(t.string))
        elif t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER) and t.string not in "[],":
            stray.append(t.string)
    if stray or not text.strip().startswith("["):
        raise MiniMindError(f"{where}: field 'choices' is not a list of quoted texts: {text[:60]!r}")
    return strings


def _option_columns(row: dict) -> list | None:
    """Options one per column: A, B, C, ... (C-Eval, CMMLU) or choice0, choice1, ... (the hub's CSV export)."""
    for names in (LETTERS.lower(), [f"choice{i}" for i in range(len(LETTERS))]):
        texts = []
        for name in names:
            if name not in row:
                break
            texts.append(row[name])
        if texts:
            return texts
    return None


def _item(row: dict, subject: str, where: str) -> MCItem:
    """One question from a row of any layout, its keys lower-cased: ARC ({"question": {"stem", "choices":
    [{"text", "label"}]}, "answerKey"}), its hub form ({"question", "choices": {"text", "label"}, "answerKey"}),
    MMLU's hub form ({"question", "subject", "choices": [...], "answer": 0-3}), or one column per option (C-Eval
    `id,question,A,B,C,D,answer`, CMMLU `Question,A,B,C,D,Answer`, `question,choice0,...,answer`)."""
    question, choices = row.get("question"), row.get("choices")
    if isinstance(question, dict):
        question, choices = question.get("stem"), question.get("choices")
    if isinstance(choices, str):
        choices = _list_cell(choices, where)
    labels = None
    if isinstance(choices, dict):
        texts, labels = choices.get("text"), choices.get("label")
    elif isinstance(choices, list) and choices and all(isinstance(c, dict) for c in choices):
        texts, labels = [c.get("text") for c in choices], [str(c.get("label")) for c in choices]
    elif choices is not None:
        texts = choices
    else:
        texts = _option_columns(row)
    if not isinstance(question, str) or not isinstance(texts, list) or not 2 <= len(texts) <= len(LETTERS) \
            or not all(isinstance(t, str) for t in texts):
        raise MiniMindError(f"{where}: expected a question and 2 to {len(LETTERS)} text choices (a 'choices' list, "
                            "or columns A, B, ... or choice0, choice1, ...)")
    labels = [str(x) for x in labels or LETTERS[:len(texts)]]
    key = next((k for k in ANSWER_KEYS if k in row), None)
    if key is None or row[key] is None or str(row[key]).strip() == "":
        raise MiniMindError(f"{where}: no answer: {NO_ANSWERS}")
    return MCItem(question, list(texts), _answer_index(row[key], labels, where),
                  str(row.get("subject") or subject), where)


def _lower_keys(row: dict) -> dict:
    return {str(k).strip().lower(): v for k, v in row.items()}


def _read_csv(path: Path) -> list[MCItem]:
    """With a header naming a `question` column (C-Eval, CMMLU, the hub's exports), or without one (MMLU's own
    files: question, options..., answer). Messages name the physical line, which differs from the record number
    when a quoted field spans lines."""
    records = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            start = 1
            for row in reader:
                records.append((start, row))
                start = reader.line_num + 1
    except (UnicodeDecodeError, csv.Error) as e:
        raise MiniMindError(f"{path}:{start}: unreadable CSV ({e})") from None
    records = [(line, row) for line, row in records if any(c.strip() for c in row)]
    if not records:
        return []
    header = [c.strip().lower() for c in records[0][1]]
    subject = _subject(path)
    items = []
    if "question" in header:
        if not any(k in header for k in ANSWER_KEYS):
            raise MiniMindError(f"{path}:{records[0][0]}: no 'answer' column: {NO_ANSWERS}")
        for line, row in records[1:]:
            if len(row) != len(header):
                raise MiniMindError(f"{path}:{line}: expected {len(header)} columns (as in the header), "
                                    f"found {len(row)}")
            items.append(_item(dict(zip(header, row)), subject, f"{path}:{line}"))
        return items
    width = len(records[0][1])
    if width < 4:
        raise MiniMindError(f"{path}:{records[0][0]}: expected a header naming a 'question' column, or MMLU's "
                            "columns without one: question, options..., answer")
    for line, row in records:
        if len(row) != width:
            raise MiniMindError(f"{path}:{line}: expected {width} columns, found {len(row)}")
        items.append(_item({"question": row[0], "choices": row[1:-1], "answer": row[-1]}, subject, f"{path}:{line}"))
    return items


def _read_jsonl(path: Path) -> list[MCItem]:
    items = []
    subject = _subject(path)
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
            items.append(_item(_lower_keys(row), subject, where))
    return items


def _read_parquet(path: Path) -> list[MCItem]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MiniMindError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged or foreign file
        raise MiniMindError(f"{path}: unreadable Parquet ({e})") from None
    subject = _subject(path)
    return [_item(_lower_keys(row), subject, f"{path}: row {n}") for n, row in enumerate(rows, 1)]


READERS = {".csv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def read_mc(path: str | Path) -> list[MCItem]:
    """Items of a .csv, .jsonl or .parquet file, of every such file under a directory (one subject per file,
    unless the rows name theirs), or of the files a glob pattern matches (`mmlu/*/test-*.parquet`: one split of
    the hub's layout, which keeps every split of a subject in its folder)."""
    pattern = str(path)
    path = Path(path)
    if not path.exists() and any(c in pattern for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).suffix.lower() in SUFFIXES)
        if not files:
            raise MiniMindError(f"{pattern}: no .csv, .jsonl or .parquet file matches")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not files:
            raise MiniMindError(f"{path}: no .csv, .jsonl or .parquet files")
    elif path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise MiniMindError(f"{path}: expected a .csv (C-Eval/CMMLU/MMLU), .jsonl or .parquet file")
        files = [path]
    else:
        raise MiniMindError(f"{path}: no such file or directory")
    items: list[MCItem] = []
    for f in files:
        items += READERS[f.suffix.lower()](f)
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
                   progress: bool = False, bos: bool = True) -> list[tuple[float, int]]:
    """(sum of log p(continuation tokens | context), number of continuation tokens) for each request. The
    context starts with `<|im_start|>` as in pretraining (`bos=False`: not, as lm-eval's default for this
    tokenizer); too long a context loses its oldest tokens. Requests whose model input is the same (one context,
    one-token continuations: the letters) share one forward pass, as in lm-eval."""
    from tqdm import tqdm

    limit = model.config.max_position_embeddings
    device = model.model.embed_tokens.weight.device
    rows: dict[tuple[int, ...], int] = {}  # model input -> row number
    targets = []  # per request: (row, first predicting position, continuation ids)
    for context, continuation in requests:
        ctx = [model.config.bos_token_id] * bos + tokenizer.encode(context, add_special_tokens=False)
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        if not cont or len(cont) > limit:
            raise MiniMindError(f"option {continuation.strip()[:40]!r} has {len(cont)} tokens; it must have 1 to "
                                f"{limit} (the model's context)")
        if not ctx:
            raise MiniMindError("an empty context with bos off: nothing to predict the first option token from")
        # The last token is predicted, never read: the input is at most `limit` tokens before it.
        inputs = tuple((ctx + cont)[-(limit + 1):-1])
        row = rows.setdefault(inputs, len(rows))
        targets.append((row, len(inputs) - len(cont), cont))
    inputs_of = list(rows)
    by_row: dict[int, list[int]] = defaultdict(list)
    for r, (row, _, _) in enumerate(targets):
        by_row[row].append(r)
    order = sorted(range(len(inputs_of)), key=lambda i: -len(inputs_of[i]))  # similar lengths share a batch
    out: list[tuple[float, int]] = [(0.0, 0)] * len(targets)
    bar = tqdm(total=len(targets), desc="scoring", unit=" options", disable=not progress, leave=False)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo:lo + batch_size]
        width = max(len(inputs_of[i]) for i in chunk)
        ids = torch.full((len(chunk), width), model.config.pad_token_id, dtype=torch.long)
        for b, i in enumerate(chunk):
            ids[b, :len(inputs_of[i])] = torch.tensor(inputs_of[i])
        # Right padding needs no mask: causal attention never lets a real token see the padding after it.
        logits = model(ids.to(device)).logits
        batch_rows, positions, tokens, owners = [], [], [], []
        for b, i in enumerate(chunk):
            for r in by_row[i]:
                _, first, cont = targets[r]
                batch_rows += [b] * len(cont)
                positions += range(first, first + len(cont))
                tokens += cont
                owners += [r] * len(cont)
        nll = token_nll(logits[batch_rows, positions], torch.tensor(tokens, device=logits.device))
        sums = torch.zeros(len(targets), dtype=nll.dtype, device=nll.device)
        sums.index_add_(0, torch.tensor(owners, device=nll.device), -nll)
        for r in set(owners):
            out[r] = (sums[r].item(), len(targets[r][2]))
        bar.update(sum(len(by_row[i]) for i in chunk))
    bar.close()
    return out


@dataclass
class MCResult:
    """lm-eval's metrics: `acc` (the highest log-likelihood is the answer), `acc_norm` (log-likelihood per
    character of the option), `acc_bytes` (per UTF-8 byte); the same on English, apart on Chinese."""

    mode: str = "loglik"
    few_shot: int = 0  # asked for
    total: int = 0
    correct: int = 0
    correct_norm: int = 0
    correct_bytes: int = 0
    by_subject: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0, 0]))
    shots: dict[str, int] = field(default_factory=dict)  # the fewest few-shot examples an item of the subject got
    samples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / max(self.total, 1)

    @property
    def acc_bytes(self) -> float:
        return self.correct_bytes / max(self.total, 1)

    def subject_accuracy(self) -> dict[str, dict[str, float]]:
        return {s: {"n": n, "shots": self.shots[s], "accuracy": c / max(n, 1), "acc_norm": cn / max(n, 1),
                    "acc_bytes": cb / max(n, 1)}
                for s, (c, cn, cb, n) in sorted(self.by_subject.items())}

    @property
    def macro_accuracy(self) -> float:
        """The mean of the per-subject accuracies (C-Eval and MMLU report this average too)."""
        subjects = self.subject_accuracy()
        return sum(s["accuracy"] for s in subjects.values()) / max(len(subjects), 1)

    def short_of_shots(self) -> dict[str, int]:
        """Subjects whose items got fewer few-shot examples than asked for: {subject: fewest}."""
        return {s: n for s, n in sorted(self.shots.items()) if n < self.few_shot}


def evaluate_mc(model: MiniMindForCausalLM, tokenizer, items: Sequence[MCItem], few_shot: int = 0,
                mode: str = "loglik", limit: int | None = None, batch_size: int = 16, progress: bool = False,
                shot_pool: Sequence[MCItem] | None = None, bos: bool = True) -> MCResult:
    """Score every item (or `limit` of them, taken round-robin over subjects); `few_shot` examples come from the
    same subject of `shot_pool` (default: the items themselves, never the item being asked). A subject with
    fewer examples gets fewer (`result.shots` records how many); none at all for every subject is an error."""
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
    if few_shot > 0 and not any(shots[i] for i in chosen):
        where = "the --shots pool" if shot_pool is not None else "the other questions of each subject"
        raise MiniMindError(f"{few_shot}-shot asked, but {where} gave no subject any example (subjects asked: "
                            f"{', '.join(sorted({items[i].subject for i in chosen})[:5])}...; the pool's subjects "
                            "must match, e.g. accountant_dev.csv for accountant_val.csv)")
    requests, owner = [], []
    for i in chosen:
        for r in requests_for(items[i], shots[i], mode):
            requests.append(r)
            owner.append(i)
    scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress, bos=bos)
    per_item: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
    for i, (_, continuation), (ll, _) in zip(owner, requests, scores):
        option = continuation[1:]  # lm-eval divides by the option's length, without the space before it
        per_item[i].append((ll, ll / max(len(option), 1), ll / max(len(option.encode("utf-8")), 1)))
    result = MCResult(mode=mode, few_shot=few_shot)
    for i in chosen:
        item, lls = items[i], per_item[i]
        preds = [max(range(len(lls)), key=lambda c, m=m: lls[c][m]) for m in range(3)]
        ok = [p == item.answer for p in preds]
        result.total += 1
        result.correct += ok[0]
        result.correct_norm += ok[1]
        result.correct_bytes += ok[2]
        counts = result.by_subject[item.subject]
        for m in range(3):
            counts[m] += ok[m]
        counts[3] += 1
        result.shots[item.subject] = min(result.shots.get(item.subject, few_shot), len(shots[i]))
        if len(result.samples) < 200:
            result.samples.append({"where": item.where, "subject": item.subject, "answer": LETTERS[item.answer],
                                   "predicted": LETTERS[preds[0]], "shots": len(shots[i]),
                                   "loglik": [round(x[0], 4) for x in lls]})
    return result
