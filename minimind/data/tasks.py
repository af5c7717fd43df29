"""Generated tasks with checkable answers (arithmetic with worked steps, counting, unit conversion, identity,
calculator tool calls) as MiniMind SFT rows. `train, heldout = heldout_split(2000, 200, seed=0)`."""

from __future__ import annotations

import random
import re
import unicodedata
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from minimind import MiniMindError
from minimind.chat import parse_assistant
from minimind.tools import TOOLS, run_tool

FAMILIES: tuple[str, ...] = ("arithmetic", "counting", "units", "identity", "calculator", "converter")
TOOL_FAMILIES = ("calculator", "converter")  # their replies call a tool (minimind.tools) before answering
SPLITS = ("train", "heldout")
REASONING_FAMILIES = ("arithmetic", "counting", "units")  # their replies carry worked steps as thinking
# A problem's split is a hash of its canonical form (operands, word, ...), not of the seed or the phrasing,
# so no seed and no rewording can bring a held-out problem into training.
HELDOUT_PERCENT = 10
DEDUPE_TRIES = 200  # draws spent looking for an unseen question before a (small) family may repeat one
SPLIT_TRIES = 5000  # draws without a single problem of the wanted split means the family cannot supply it


# Fixed phrasing per language: a ~5M-parameter model learns a template in minutes, variety in hours.
TEXT = {
    "en": {
        "answer": "The answer is {}.",
        "so": "So {} = {}.",
        "ask": ("What is {}?", "Calculate {}.", "What does {} equal?"),
        "places": ("ones: ", "tens: ", "hundreds: ", "thousands: ", "ten-thousands: "),
        "carry": ", write {} carry 1",
        "borrow": " (borrow 1)",
        "letters_ask": ('How many times does the letter "{c}" appear in "{w}"?',
                        'How many "{c}" are in the word "{w}"?'),
        "letters_total": 'Count of "{c}": {n}.',
        "words_ask": ('How many words are in the sentence "{s}"?', 'Count the words in "{s}".'),
        "words_total": "{n} words.",
        "units_ask": ("How many {to} are in {v} {frm}?", "Convert {v} {frm} to {to}."),
        "units_mul": "1 {one} = {f} {small}, so {v} {big} = {v} * {f} = {r} {small}.",
        "units_div": "1 {one} = {f} {small}, so {v} {small} = {v} / {f} = {r} {big}.",
        "units": {"km": "kilometers", "m": "meters", "kg": "kilograms", "g": "grams", "h": "hours", "min": "minutes"},
        "one": {"km": "kilometer", "kg": "kilogram", "h": "hour"},
        "system": "You are MiniMind. Use the tools for arithmetic and unit conversion.",
    },
    "zh": {
        "answer": "答案是 {}。",
        "so": "所以 {} = {}。",
        "ask": ("计算 {} 等于多少？", "{} 等于多少？", "请计算 {}。"),
        "places": ("个位：", "十位：", "百位：", "千位：", "万位："),
        "carry": "，写 {} 进 1",
        "borrow": "（借 1）",
        "letters_ask": ('单词 "{w}" 里有几个字母 "{c}"？', '"{w}" 中字母 "{c}" 出现了几次？'),
        "letters_total": '字母 "{c}" 共 {n} 个。',
        "words_ask": ('句子 "{s}" 有几个单词？', '"{s}" 里有多少个单词？'),
        "words_total": "共 {n} 个单词。",
        "units_ask": ("{v} {frm}等于多少{to}？", "把 {v} {frm}换算成{to}。"),
        "units_mul": "1 {one} = {f} {small}，所以 {v} {big} = {v} * {f} = {r} {small}。",
        "units_div": "1 {one} = {f} {small}，所以 {v} {small} = {v} / {f} = {r} {big}。",
        "units": {"km": "千米", "m": "米", "kg": "千克", "g": "克", "h": "小时", "min": "分钟"},
        "one": {"km": "千米", "kg": "千克", "h": "小时"},
        "system": "你是 MiniMind，可以使用工具做算术和单位换算。",
    },
}

IDENTITY = {
    "en": {
        "prefix": ("", "Hi! ", "Hello, ", "Hey, ", "Excuse me, "),
        "ask": ("who are you?", "what is your name?", "what are you?", "tell me about yourself.",
                "introduce yourself.", "what should I call you?", "are you a human?", "what kind of model are you?"),
        "reply": ("I am MiniMind, a small language model.", "I am MiniMind, a small language model. How can I help?",
                  "My name is MiniMind. I am a small language model."),
    },
    "zh": {
        "prefix": ("", "你好！", "嗨，", "请问", "打扰一下，"),
        "ask": ("你是谁？", "你叫什么名字？", "你是什么？", "介绍一下你自己。", "我该怎么称呼你？", "你是人类吗？",
                "你是什么模型？", "你的名字是什么？"),
        "reply": ("我是 MiniMind，一个小型语言模型。", "我是 MiniMind，一个小型语言模型。有什么可以帮你？",
                  "我叫 MiniMind，是一个小型语言模型。"),
    },
}

WORDS = (
    "apple banana cherry orange lemon grape melon peach mango berry strawberry tomato potato carrot pepper "
    "coffee butter cookie bottle letter pillow window garden forest river mountain island ocean planet rocket "
    "yellow purple silver little happy summer winter spring autumn morning evening tomorrow yesterday "
    "teacher student doctor farmer sister brother mother father rabbit monkey kitten puppy turtle parrot "
    "pencil paper school library market street bridge castle dragon wizard pirate banana balloon bubble "
    "mississippi committee assessment necessary occurrence bookkeeper address success baseball football"
).split()
UNITS = (("km", "m", 1000, 99), ("kg", "g", 1000, 99), ("h", "min", 60, 48))  # big, small, factor, max big value


@dataclass(frozen=True)
class Problem:
    key: tuple  # the canonical problem, the same in every phrasing and language: it decides the split
    question: str
    answer: str
    content: str  # the final assistant reply
    reasoning: str = ""
    lang: str = "en"
    call: dict | None = None  # tool families: the tool call {"name", "arguments"} the reply makes


def split_of(key: tuple) -> str:
    """'heldout' for a fixed HELDOUT_PERCENT of problems, else 'train' (crc32: stable across runs)."""
    return "heldout" if zlib.crc32(repr(key).encode()) % 100 < HELDOUT_PERCENT else "train"


# ---------------------------------------------------------------------------------------------- families


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _digits(n: int, width: int) -> list[int]:
    """Least significant first, zero-padded to `width`."""
    return [n // 10**i % 10 for i in range(width)]


def worked_steps(a: int, op: str, b: int, lang: str) -> str:
    """Short written working: the problem restated, then column addition with carries or column subtraction with
    borrows (a >= b).

    The restatement is there for a small model: copying `23 + 45` from the question is plain in-order copying,
    and the columns then take their digits from a line at a fixed distance. Measured on the demo's tiny model
    after 800 arithmetic-only SFT steps of 16 rows, teacher-forced: column digits right 58% without it, 74%
    with it (97% with 32 rows a step)."""
    t = TEXT[lang]
    lines = [f"{a} {op} {b}"]
    width = len(str(max(a, b)))
    carry = 0
    for place, da, db in zip(t["places"], _digits(a, width), _digits(b, width)):
        if op == "+":
            s = da + db + carry
            lines.append(f"{place}{da} + {db}{' + 1' if carry else ''} = {s}"
                         + (t["carry"].format(s % 10) if s >= 10 else ""))
            carry = int(s >= 10)
        else:
            borrow = int(da - carry < db)
            r = da + 10 * borrow - carry - db
            lines.append(f"{place}{da + 10 * borrow}{' - 1' if carry else ''} - {db} = {r}"
                         + (t["borrow"] if borrow else ""))
            carry = borrow
    lines.append(t["so"].format(f"{a} {op} {b}", _result(a, op, b)))
    return "\n".join(lines)


def _operands(rng: random.Random, op: str, sizes: dict[str, Sequence[tuple[int, int]]]) -> tuple[int, int]:
    da, db = rng.choice(sizes[op])
    a, b = _number(rng, da), _number(rng, db)
    if op == "-" and a < b:
        a, b = b, a  # non-negative results: one less thing for a tiny model to learn
    return a, b


def _key(a: int, op: str, b: int) -> tuple:
    # Commutative problems share one key, so "23 + 45" cannot be trained on while "45 + 23" is held out.
    return ("arith", op, *sorted((a, b))) if op in "+*" else ("arith", op, a, b)


def _result(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


# Operand digit counts, drawn uniformly: sums and differences of up to two digits. That is what a ~5M-parameter
# model learns to work out in its head in minutes. Measured after the demo's SFT: three-digit problems in the
# mix left it at 0% held-out, and so did products (0 of 44: the times table is a lookup it had not learned).
# Products and bigger numbers are the calculator's job.
ARITHMETIC_SIZES = {"+": [(1, 1), (2, 1), (2, 2)], "-": [(1, 1), (2, 1), (2, 2)]}
CALCULATOR_SIZES = {"+": [(3, 3), (4, 3), (4, 4)], "-": [(3, 3), (4, 3), (4, 4)], "*": [(2, 2), (3, 2), (3, 3)]}


def _arithmetic(rng: random.Random, lang: str) -> Problem:
    op = rng.choice("".join(ARITHMETIC_SIZES))
    a, b = _operands(rng, op, ARITHMETIC_SIZES)
    r = _result(a, op, b)
    return Problem(_key(a, op, b), rng.choice(TEXT[lang]["ask"]).format(f"{a} {op} {b}"), str(r),
                   TEXT[lang]["answer"].format(r), worked_steps(a, op, b, lang), lang)


def arithmetic_drill(n_docs: int, seed: int = 0, facts_per_doc: int = 24) -> list[str]:
    """Plain-text documents of the one-column facts that worked steps are made of (`6 + 7 = 13`,
    `6 + 7 + 1 = 14`, `16 - 9 = 7`, `16 - 1 - 9 = 6`), for pretraining: about eight tokens a fact, where a
    worked problem gives two or three facts in sixty. Measured on the demo's pretraining, 1,500 of these
    documents raised the share of sum-fact digits it predicts right from 23% to 29%. A fact whose two operands
    form a held-out problem is left out."""
    rng = random.Random(f"minimind-drill/{seed}")
    docs = []
    for _ in range(n_docs):
        lines: list[str] = []
        while len(lines) < facts_per_doc:
            fact = _drill_fact(rng)
            if fact:
                lines.append(fact)
        docs.append("\n".join(lines))
    return docs


def _drill_fact(rng: random.Random) -> str | None:
    x, y = rng.randint(0, 9), rng.randint(0, 9)
    form = rng.randrange(4)
    if form == 1:
        return f"{x} + {y} + 1 = {x + y + 1}"  # a column with a carry in: no problem has this shape
    if form == 3:
        return f"{x + y + 1} - 1 - {y} = {x}"  # a column that lent a borrow
    a, op, b = (x, "+", y) if form == 0 else (x + y, "-", y)
    return f"{a} {op} {b} = {_result(a, op, b)}" if split_of(_key(a, op, b)) == "train" else None


def _calculator(rng: random.Random, lang: str) -> Problem:
    op = rng.choice("+-*")
    a, b = _operands(rng, op, CALCULATOR_SIZES)
    r = _result(a, op, b)
    return Problem(_key(a, op, b), rng.choice(TEXT[lang]["ask"]).format(f"{a} {op} {b}"), str(r),
                   TEXT[lang]["answer"].format(r), lang=lang,
                   call={"name": "calculator", "arguments": {"expression": f"{a}{op}{b}"}})


def _counting(rng: random.Random, lang: str) -> Problem:
    t = TEXT[lang]
    if rng.random() < 0.5:
        word = rng.choice(WORDS)
        # Mostly a letter of the word; sometimes any letter, so "0" is a possible answer.
        c = rng.choice(word) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        spelled, n = [], 0
        for ch in word:
            n += ch == c
            spelled.append(f"{ch}({n})" if ch == c else ch)
        reasoning = f"{word}: {' '.join(spelled)}\n" + t["letters_total"].format(c=c, n=n)
        return Problem(("letters", word, c), rng.choice(t["letters_ask"]).format(c=c, w=word), str(n),
                       t["answer"].format(n), reasoning, lang)
    words = rng.choices(WORDS, k=rng.randint(3, 8))
    sentence = " ".join(words)
    reasoning = " ".join(f"{w}({i})" for i, w in enumerate(words, 1)) + "\n" + t["words_total"].format(n=len(words))
    return Problem(("words", sentence), rng.choice(t["words_ask"]).format(s=sentence), str(len(words)),
                   t["answer"].format(len(words)), reasoning, lang)


def _unit_problem(rng: random.Random, lang: str) -> tuple[tuple, str, str, str, str, int, int]:
    """A unit question with an exact answer: (key, question, source unit, target unit, worked step, given, result)."""
    t = TEXT[lang]
    big, small, factor, most = rng.choice(UNITS)
    v = rng.randint(2, most)
    name = t["units"]
    if rng.random() < 0.5:  # big -> small: multiply
        frm, to, given, r, steps = big, small, v, v * factor, t["units_mul"]
    else:  # small -> big: divide, chosen so that it divides exactly
        frm, to, given, r, steps = small, big, v * factor, v, t["units_div"]
    reasoning = steps.format(one=t["one"][big], big=name[big], small=name[small], f=factor, v=given, r=r)
    question = rng.choice(t["units_ask"]).format(v=given, frm=name[frm], to=name[to])
    return ("units", frm, to, given), question, frm, to, reasoning, given, r


def _units(rng: random.Random, lang: str) -> Problem:
    key, question, _, to, reasoning, _, r = _unit_problem(rng, lang)
    return Problem(key, question, str(r), TEXT[lang]["answer"].format(f"{r} {TEXT[lang]['units'][to]}"), reasoning,
                   lang)


def _converter(rng: random.Random, lang: str) -> Problem:
    key, question, frm, to, _, given, r = _unit_problem(rng, lang)
    return Problem(key, question, str(r), TEXT[lang]["answer"].format(f"{r} {TEXT[lang]['units'][to]}"), lang=lang,
                   call={"name": "unit_convert", "arguments": {"value": given, "from_unit": frm, "to_unit": to}})


def _identity(rng: random.Random, lang: str) -> Problem:
    table = IDENTITY[lang]
    prefix, ask = rng.choice(table["prefix"]), rng.choice(table["ask"])
    question = prefix + (ask if prefix.endswith(", ") else ask[0].upper() + ask[1:])
    return Problem(("identity", question.lower()), question, "MiniMind", rng.choice(table["reply"]), lang=lang)


GENERATORS: dict[str, Callable[[random.Random, str], Problem]] = {
    "arithmetic": _arithmetic, "counting": _counting, "units": _units, "identity": _identity,
    "calculator": _calculator, "converter": _converter,
}


def to_row(p: Problem, family: str) -> dict:
    """A problem as a MiniMind SFT row with the expected answer and the family name."""
    user = {"role": "user", "content": p.question}
    if p.call:
        # Both tools are offered, so the model must pick the right one, as it will have to in a real chat.
        conversation = [
            {"role": "system", "content": TEXT[p.lang]["system"], "tools": [t.schema for t in TOOLS.values()]},
            user,
            {"role": "assistant", "content": "", "tool_calls": [p.call]},
            {"role": "tool", "content": run_tool(p.call["name"], p.call["arguments"])},
            {"role": "assistant", "content": p.content},
        ]
    else:
        reply = {"role": "assistant", "content": p.content}
        if p.reasoning:
            reply["reasoning_content"] = p.reasoning
        conversation = [user, reply]
    return {"conversations": conversation, "answer": p.answer, "task": family}


# ---------------------------------------------------------------------------------------------- public API


def _families(families: Sequence[str] | None) -> tuple[str, ...]:
    chosen = tuple(families) if families else FAMILIES
    unknown = [f for f in chosen if f not in GENERATORS]
    if unknown:
        raise MiniMindError(f"unknown task family {unknown[0]!r}; expected one of {', '.join(FAMILIES)}")
    return chosen


def question_of(row: dict) -> str:
    """The (first) user message of a task row: what held-out and training tasks must never share."""
    return next(m["content"] for m in row["conversations"] if m["role"] == "user")


def make_tasks(n: int, seed: int, families: Sequence[str] | None = None, split: str = "train") -> list[dict]:
    """`n` task rows, deterministic for `seed`, families taken in turn (then shuffled), questions unique
    where the family has enough of them, every problem from `split` ('train' or 'heldout'), half English
    and half Chinese."""
    if split not in SPLITS:
        raise MiniMindError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    chosen = _families(families)
    rng = random.Random(f"minimind-tasks/{seed}/{split}")
    rows: list[dict] = []
    seen: set[str] = set()
    for i in range(n):
        family = chosen[i % len(chosen)]
        picked = None
        for attempt in range(SPLIT_TRIES):
            p = GENERATORS[family](rng, rng.choice(("en", "zh")))
            if split_of(p.key) != split:
                continue
            picked = p
            if p.question not in seen or attempt >= DEDUPE_TRIES:
                break
        if picked is None:
            raise MiniMindError(f"task family {family!r} produced no {split} problem in {SPLIT_TRIES} tries")
        seen.add(picked.question)
        rows.append(to_row(picked, family))
    rng.shuffle(rows)
    return rows


def heldout_split(n_train: int, n_heldout: int, seed: int = 0,
                  families: Sequence[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(training tasks, held-out tasks). The problems are disjoint by construction (see split_of); as a second
    guard, a training row whose question text also occurs in the held-out rows is dropped."""
    train = make_tasks(n_train, seed, families, "train")
    heldout = make_tasks(n_heldout, seed, families, "heldout")
    excluded = {question_of(r) for r in heldout}
    return [r for r in train if question_of(r) not in excluded], heldout


def prompt_row(task: dict) -> dict:
    """A task as an RL / evaluation prompt: the conversation up to its user turn, with `answer` and `task`."""
    messages = task["conversations"]
    user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    return {"conversations": messages[: user + 1], "answer": task["answer"], "task": task["task"]}


WRONG_IDENTITY = {"en": "I don't know.", "zh": "我不知道。"}


def make_dpo_pairs(tasks: Sequence[dict], seed: int) -> list[dict]:
    """DPO rows from task rows: chosen is the task's reply; rejected gives a nearby wrong number (same
    working), answers the calculator question without calling the tool, or fails to say who it is."""
    rng = random.Random(f"minimind-dpo/{seed}")
    pairs = []
    for task in tasks:
        chosen = task["conversations"]
        user = next(i for i, m in enumerate(chosen) if m["role"] == "user")
        answer = task["answer"]
        if NUMBER_RE.fullmatch(answer):
            wrong = str(abs(int(answer) + rng.choice((-10, -2, -1, 1, 2, 10))))
            wrong = wrong if wrong != answer else str(int(answer) + 1)
            final = chosen[-1]
            reply = {**final, "content": final["content"].replace(answer, wrong)}
            reply.pop("tool_calls", None)
        else:
            zh = re.search(r"[\u4e00-\u9fff]", chosen[user]["content"])
            reply = {"role": "assistant", "content": WRONG_IDENTITY["zh" if zh else "en"]}
        pairs.append({"chosen": chosen, "rejected": [*chosen[: user + 1], reply], "task": task["task"]})
    return pairs


# ---------------------------------------------------------------------------------------------- checking

_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
NUMBER_RE = re.compile(_NUMBER)  # a number as the tasks write it; rewards and preference mining match it too
_PHRASE_RE = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*:|answer\s*:|答案是|答案为|答案\s*:)",
                        re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"(?:[.!?](?:\s|$)|[。！？\n])")


def _plain_number(s: str) -> str:
    return s.replace(",", "")


def _boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1: j].strip()
    return None


def _visible(text: str) -> str:
    """What the model said after thinking and outside tool calls; full-width digits and colons made ASCII."""
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-")
    return parse_assistant(text)["content"]


def extract_answer(text: str) -> str | None:
    """The final answer in generated text: what follows the last "The answer is" / "答案是" (its first number,
    after any "="), else the last \\boxed{...}, else the last number. Thinking is ignored."""
    content = _visible(text)
    phrases = list(_PHRASE_RE.finditer(content))
    if phrases:
        rest = content[phrases[-1].end():].lstrip(" :*$")
        end = _SENTENCE_END_RE.search(rest)
        sentence = rest[: end.start()] if end else rest
        sentence = sentence.rsplit("=", 1)[-1]
        number = NUMBER_RE.search(sentence)
        if number:
            return _plain_number(number.group(0))
        if sentence.strip(" *"):
            return sentence.strip(" *")
    boxed = _boxed(content)
    if boxed is not None:
        number = NUMBER_RE.fullmatch(boxed.strip("$ "))
        return _plain_number(number.group(0)) if number else boxed
    numbers = NUMBER_RE.findall(content)
    return _plain_number(numbers[-1]) if numbers else None


def is_correct(task: dict, generated_text: str) -> bool:
    """Whether the generated reply gets the task's answer: numbers compare by value; a word answer (identity)
    must appear in the reply, case-insensitively."""
    expected = str(task["answer"]).strip()
    got = extract_answer(generated_text)
    if NUMBER_RE.fullmatch(expected):
        if got is None or not NUMBER_RE.fullmatch(got):
            return False
        return abs(float(_plain_number(got)) - float(_plain_number(expected))) < 1e-6
    return expected.lower() in _visible(generated_text).lower()
