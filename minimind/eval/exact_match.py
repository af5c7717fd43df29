"""GSM8K-style exact match: greedy answers to {"question", "answer"} rows (GSM8K's "... #### 72" answers too), the
final answer extracted (phrase, \\boxed{}, last number) and compared by value. `evaluate_exact(model, tok, rows)`;
CLI: `minimind eval --model DIR --task gsm8k --data test.jsonl [--think] [--few-shot 4]`."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from minimind import MiniMindError
from minimind.chat import encode_chat
from minimind.data.tasks import extract_answer, is_correct
from minimind.generation import SamplingParams, generate
from minimind.model import MiniMindForCausalLM

_CALC_RE = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: 48/2=<<48/2=24>>24


def split_solution(answer: str) -> tuple[str, str]:
    """(worked solution, final answer) of a GSM8K answer "steps\\n#### 72"; a plain answer has no steps."""
    if "####" in answer:
        steps, final = answer.rsplit("####", 1)
        return _CALC_RE.sub("", steps).strip(), final.strip().replace(",", "")
    return "", answer.strip()


def read_qa(path: str | Path) -> list[dict]:
    """Rows {"question", "answer", "solution"} from a JSONL file of {"question", "answer"} (or "problem"/
    "solution"-free variants: "input"/"target")."""
    path = Path(path)
    if not path.is_file():
        raise MiniMindError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise MiniMindError(f"{path}:{line}: invalid JSON ({e.msg})") from None
            question = row.get("question", row.get("input")) if isinstance(row, dict) else None
            answer = row.get("answer", row.get("target")) if isinstance(row, dict) else None
            if not isinstance(question, str) or not question.strip():
                raise MiniMindError(f"{path}:{line}: expected a non-empty 'question' string")
            if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or not str(answer).strip():
                raise MiniMindError(f"{path}:{line}: expected an 'answer' (a string or a number)")
            solution, final = split_solution(str(answer))
            rows.append({"question": question, "answer": final, "solution": solution, "where": f"{path}:{line}"})
    if not rows:
        raise MiniMindError(f"{path}: no rows")
    return rows


def _shot_messages(shot: dict, think: bool) -> list[dict]:
    final = f"The answer is {shot['answer']}."
    reply: dict = {"role": "assistant", "content": final}
    if shot["solution"]:
        if think:
            reply["reasoning_content"] = shot["solution"]
        else:
            reply["content"] = f"{shot['solution']}\n{final}"
    return [{"role": "user", "content": shot["question"]}, reply]


@dataclass
class ExactMatchResult:
    correct: int = 0
    total: int = 0
    no_answer: int = 0  # replies with no extractable answer at all
    samples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


def evaluate_exact(model: MiniMindForCausalLM, tokenizer, rows: Sequence[dict], enable_thinking: bool = False,
                   few_shot: int = 0, max_new_tokens: int = 256, batch_size: int = 16, progress: bool = False,
                   ) -> ExactMatchResult:
    """Greedy chat replies, thinking on or off. Few-shot examples are earlier turns of the conversation: the
    `few_shot` rows before each row (wrapping round), with their worked solutions."""
    from tqdm import tqdm

    rows = list(rows)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    result = ExactMatchResult()
    bar = tqdm(total=len(rows), desc="generating", unit=" questions", disable=not progress, leave=False)
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo:lo + batch_size]
        prompts = []
        for j, row in enumerate(chunk):
            i = lo + j
            k = min(few_shot, len(rows) - 1)
            messages = [m for s in range(k) for m in _shot_messages(rows[(i - k + s) % len(rows)], enable_thinking)]
            messages.append({"role": "user", "content": row["question"]})
            ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True, enable_thinking=enable_thinking)
            prompts.append(ids)
        try:
            outs = generate(model, tokenizer, prompts, params)
        except ValueError as e:  # prompt + max_new_tokens beyond the context
            raise MiniMindError(f"{chunk[0]['where']}: {e}") from None
        for row, out in zip(chunk, outs):
            # The generation prompt already opened <think> when thinking: put it back so it is parsed away.
            text = ("<think>\n" if enable_thinking else "") + out.text
            got = extract_answer(text)
            ok = is_correct({"answer": row["answer"]}, text)
            result.correct += ok
            result.total += 1
            result.no_answer += got is None
            if len(result.samples) < 200:
                result.samples.append({"where": row["where"], "expected": row["answer"], "extracted": got,
                                       "correct": ok, "output": out.text})
        bar.update(len(chunk))
    bar.close()
    return result
