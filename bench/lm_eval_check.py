"""lm-eval side by side: small MMLU-layout (English, the hub's Parquet) and C-Eval-layout (Chinese, CSV) fixtures
scored by EleutherAI's lm-evaluation-harness and by our `eval --task mc`, per subject: acc, acc_norm, acc_bytes.
`python bench/lm_eval_check.py [--model DIR] [--venv DIR]`

lm-eval runs from a virtualenv of its own (made in a temporary folder with torch 2.13.0 and lm_eval 0.4.13, or
--venv DIR, made there once and reused); when it cannot be installed (offline) its side is skipped with a message.
The model: --model, else runs/demo/sft/model, else a random `tiny` one (what is measured is agreement, not
accuracy). Both read the same files with the same prompts; ours runs without BOS as lm-eval does (`--no-bos`),
and once more with it (our default) to show what the prefix moves."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from minimind.checkpoint import load_model
from minimind.eval.multiple_choice import LETTERS, evaluate_mc, loglikelihoods, read_mc, requests_for
from minimind.eval.perplexity import score_texts
from minimind.tokenizer import load_tokenizer

DEMO_MODEL = Path("runs/demo/sft/model")
LM_EVAL = "lm_eval[hf]==0.4.13"
TORCH = "torch==2.13.0"
SETTINGS = [("loglik", 0), ("loglik", 5), ("letter", 0)]  # (mode, shots)
N_TEST, N_DEV = 24, 5

# Chinese options mix Chinese (3 UTF-8 bytes a character) with ASCII, so that acc_norm and acc_bytes can differ.
# None is purely numeric (pandas, under lm-eval's CSV reader, would make it a number) or a word pandas reads as NaN.
KINDS_ZH = {"水果": ["苹果", "香蕉", "猕猴桃", "mango", "西瓜"], "动物": ["猫", "大熊猫", "dog", "长颈鹿", "tiger"],
            "颜色": ["红色", "blue", "浅绿色", "yellow", "紫"], "交通工具": ["自行车", "bus", "火车", "taxi", "飞机"]}
KINDS_EN = {"an animal": ["dog", "horse", "elephant", "cat", "owl"],
            "a colour": ["red", "green", "purple", "blue"], "a fruit": ["apple", "banana", "kiwi", "pear", "grape"],
            "a tool": ["hammer", "saw", "screwdriver", "drill"]}


def pick(rng: random.Random, correct: str, wrong: list[str]) -> tuple[list[str], int]:
    options = [correct, *rng.sample(wrong, 3)]
    rng.shuffle(options)
    return options, options.index(correct)


def kind_question(rng: random.Random, kinds: dict[str, list[str]], template: str) -> tuple[str, list[str], int]:
    kind = rng.choice(list(kinds))
    wrong = [w for k, words in kinds.items() if k != kind for w in words]
    return (template.format(kind), *pick(rng, rng.choice(kinds[kind]), wrong))


def en_math(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    n = a + b
    return (f"What is {a} + {b}?", *pick(rng, str(n), [str(n + d) for d in (-10, -2, -1, 1, 2, 10)]))


def en_time(rng: random.Random) -> tuple[str, list[str], int]:
    h = rng.randint(2, 9)
    return (f"How many minutes are in {h} hours?", *pick(rng, f"{60 * h} minutes",
                                                         [f"{x} minutes" for x in (30 * h, 100 * h, 24 * h, 60 + h)]))


def zh_math(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    n = a + b
    return (f"{a}个苹果加上{b}个苹果，一共有多少个苹果？",
            *pick(rng, f"{n}个", [f"{n + 1}个", f"大约{n - 10}个", f"{n * 2}个苹果", "无法确定", f"{a}个"]))


def zh_common(rng: random.Random) -> tuple[str, list[str], int]:
    return kind_question(rng, KINDS_ZH, "下列哪一项是{}？")


ENGLISH = {"elementary_mathematics": en_math, "time_units": en_time,
           "categories": lambda rng: kind_question(rng, KINDS_EN, "Which of these is {}?")}
CHINESE = {"high_school_mathematics": zh_math, "common_sense": zh_common}


def write_fixtures(root: Path, seed: int = 0) -> dict[str, dict[str, Path]]:
    """MMLU in the hub's layout (mmlu/SUBJECT/{test,dev}-00000-of-00001.parquet: question, subject, choices,
    answer 0-3) and C-Eval's (ceval/{val,dev}/SUBJECT_{val,dev}.csv: id,question,A,B,C,D,answer,explanation).
    Returns {task name: {"test": path, "dev": path}}."""
    rng = random.Random(seed)
    files: dict[str, dict[str, Path]] = {}
    for subject, make in ENGLISH.items():
        folder = root / "mmlu" / subject
        folder.mkdir(parents=True)
        files[f"mmlu_{subject}"] = {}
        for split, n in (("test", N_TEST), ("dev", N_DEV)):
            rows = [dict(zip(("question", "choices", "answer"), make(rng)), subject=subject) for _ in range(n)]
            path = folder / f"{split}-00000-of-00001.parquet"
            pq.write_table(pa.Table.from_pylist(rows), path)
            files[f"mmlu_{subject}"][split] = path
    for subject, make in CHINESE.items():
        files[f"ceval_{subject}"] = {}
        for split, n in (("val", N_TEST), ("dev", N_DEV)):
            path = root / "ceval" / split / f"{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8", newline="") as fh:
                out = csv.writer(fh)
                out.writerow(["id", "question", "A", "B", "C", "D", "answer", "explanation"])
                for i in range(n):
                    question, options, answer = make(rng)
                    out.writerow([i, question, *options, LETTERS[answer], ""])
            files[f"ceval_{subject}"]["test" if split == "val" else "dev"] = path
    return files


def task_yaml(name: str, paths: dict[str, Path], mode: str, shots: int) -> dict:
    """An lm-eval task reading our fixture files with our prompt: the question, the options listed in letter mode,
    then "Answer:" (答案： for Chinese); each option's text (or its letter) after a space."""
    mmlu = name.startswith("mmlu_")
    cue = "Answer:" if mmlu else "答案："
    fields = [f"choices[{i}]" for i in range(4)] if mmlu else list("ABCD")
    listed = "".join(f"\n{x}. {{{{{f}}}}}" for x, f in zip("ABCD", fields))
    task = {"task": f"{name}_{mode}_{shots}", "dataset_path": "parquet" if mmlu else "csv",
            "dataset_kwargs": {"data_files": {split: str(p) for split, p in paths.items()}},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "num_fewshot": shots, "output_type": "multiple_choice",
            "doc_to_text": "{{question.strip()}}" + (listed if mode == "letter" else "") + "\n" + cue,
            "doc_to_target": "answer" if mmlu else "{{['A', 'B', 'C', 'D'].index(answer)}}",
            "metric_list": [{"metric": m} for m in ("acc", "acc_norm", "acc_bytes")]}
    task["doc_to_choice"] = ["A", "B", "C", "D"] if mode == "letter" else "choices" if mmlu else "{{[A, B, C, D]}}"
    return task


def write_texts(root: Path, files: dict[str, dict[str, Path]]) -> Path:
    """Two long documents (the fixtures' questions and answers, several context windows each) for perplexity."""
    docs = []
    for lang in ("mmlu_", "ceval_"):
        lines = [f"{it.question} {it.choices[it.answer]}" for name, paths in files.items() if name.startswith(lang)
                 for split in ("test", "dev") for it in read_mc(paths[split])]
        docs.append("\n".join(lines * 12))
    path = root / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


ROLLING = "rolling_text"


def rolling_yaml(path: Path) -> dict:
    """lm-eval's perplexity task shape (as wikitext): each document scored whole by loglikelihood_rolling."""
    return {"task": ROLLING, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
            "doc_to_target": "{{text}}", "metric_list": [{"metric": "bits_per_byte"}]}


def install_lm_eval(venv: Path) -> Path | None:
    """The virtualenv's python with lm-eval importable, or None (with a message) when pip cannot install it."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import lm_eval"], capture_output=True).returncode == 0:
        return python
    print(f"installing {TORCH} and {LM_EVAL} into {venv} (a few minutes the first time) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    done = subprocess.run([python, "-m", "pip", "install", "--quiet", TORCH, LM_EVAL], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"lm-eval could not be installed, skipping its side (offline?):\n{done.stderr.strip()[-600:]}")
        return None
    return python


def run_lm_eval(python: Path, model: Path, tasks: list[dict], work: Path) -> tuple[dict, dict]:
    """lm-eval's metrics {task: {metric: value}} and per-document option log-likelihoods {task: {doc_id: [ll]}}."""
    include = work / "tasks"
    include.mkdir()
    for task in tasks:  # JSON is YAML
        (include / f"{task['task']}.yaml").write_text(json.dumps(task, ensure_ascii=False, indent=1), encoding="utf-8")
    out = work / "lm_eval_out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [python, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
           "--tasks", ",".join(t["task"] for t in tasks), "--include_path", str(include), "--device", "cpu",
           "--batch_size", "16", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"lm-eval failed:\n{done.stderr[-3000:]}")
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    metrics = {t: {k.removesuffix(",none"): v for k, v in results[t].items() if k.endswith(",none")} for t in results}
    lls: dict[str, dict[int, list[float]]] = {}
    for f in out.rglob("samples_*.jsonl"):
        task = f.name.removeprefix("samples_").rsplit("_", 1)[0]
        for line in f.read_text().splitlines():
            row = json.loads(line)  # multiple choice: [ll, is_greedy] per option; rolling: [the text's ll]
            lls.setdefault(task, {})[row["doc_id"]] = [float(r[0] if isinstance(r, list) else r)
                                                       for r in row["filtered_resps"]]
    return metrics, lls


def ours(model, tokenizer, files: dict[str, dict[str, Path]], mode: str, shots: int, bos: bool,
         with_lls: bool = True) -> tuple[dict, dict]:
    """Our metrics {task: {metric: value}} and option log-likelihoods {task: {doc index: [ll]}}, through
    evaluate_mc (the metrics) and loglikelihoods (the same requests, at full precision)."""
    metrics, lls = {}, {}
    for name, paths in files.items():
        items, pool = read_mc(paths["test"]), read_mc(paths["dev"])
        result = evaluate_mc(model, tokenizer, items, few_shot=shots, mode=mode, shot_pool=pool, bos=bos)
        metrics[name] = {"acc": result.accuracy, "acc_norm": result.acc_norm, "acc_bytes": result.acc_bytes}
        if not with_lls:
            continue
        requests = [requests_for(it, pool[:shots], mode) for it in items]
        flat = loglikelihoods(model, tokenizer, [r for rs in requests for r in rs], bos=bos)
        lls[name], at = {}, 0
        for i, rs in enumerate(requests):
            lls[name][i] = [ll for ll, _ in flat[at:at + len(rs)]]
            at += len(rs)
    return metrics, lls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: runs/demo/sft/model, else random)")
    parser.add_argument("--venv", default=None, help="virtualenv for lm-eval, made there if absent and reused")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lm_eval_check_") as tmp:
        work = Path(tmp)
        if args.model:
            model_dir = Path(args.model)
        elif DEMO_MODEL.is_dir():
            model_dir = DEMO_MODEL
        else:
            sys.path.insert(0, str(Path(__file__).parent))
            from llamacpp_check import tiny_model

            print("no --model and no demo run: a random tiny model", flush=True)
            model_dir = tiny_model(work)
        model_dir = model_dir.resolve()
        files = write_fixtures(work / "data")
        texts = write_texts(work / "data", files)
        model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
        python = install_lm_eval(Path(args.venv) if args.venv else work / "venv")
        t0 = time.perf_counter()
        if python is not None:
            tasks = [task_yaml(name, paths, mode, shots) for mode, shots in SETTINGS for name, paths in files.items()]
            tasks.append(rolling_yaml(texts))
            theirs, their_lls = run_lm_eval(python, model_dir, tasks, work)
        if python:
            version = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"],
                                     capture_output=True, text=True).stdout.strip()
            print(f"lm-eval {version}: {time.perf_counter() - t0:.0f} s")
        n_items = {name: len(read_mc(paths["test"])) for name, paths in files.items()}
        header = f"{'setting':<14}{'subject':<31}{'n':>3}  {'lm-eval acc/norm/bytes':>23}  " \
                 f"{'ours --no-bos':>19}  {'ours (BOS)':>19}"
        print(f"\nmodel {model_dir}\n{header}\n{'-' * len(header)}")
        worst, options, same = 0.0, 0, True
        for mode, shots in SETTINGS:
            mine, my_lls = ours(model, tokenizer, files, mode, shots, bos=False)
            with_bos, _ = ours(model, tokenizer, files, mode, shots, bos=True, with_lls=False)
            for name in files:
                task = f"{name}_{mode}_{shots}"
                row = [mine[name], with_bos[name]]
                cells = ["{acc:.3f} {acc_norm:.3f} {acc_bytes:.3f}".format(**m) for m in row]
                lm = "{acc:.3f} {acc_norm:.3f} {acc_bytes:.3f}".format(**theirs[task]) if python else "-"
                print(f"{mode + ' ' + str(shots) + '-shot':<14}{name:<31}{n_items[name]:>3}  {lm:>23}  "
                      f"{cells[0]:>19}  {cells[1]:>19}")
                if python:
                    same &= all(abs(theirs[task][m] - mine[name][m]) < 1e-9 for m in mine[name])
                    for doc, lls in their_lls[task].items():
                        options += len(lls)
                        worst = max(worst, *(abs(a - b) for a, b in zip(lls, my_lls[name][doc])))
        docs = [json.loads(line)["text"] for line in texts.read_text(encoding="utf-8").splitlines()]
        window = model.config.max_position_embeddings  # lm-eval's max_length for this model
        per_doc = [score_texts(model, tokenizer, [d], seq_len=window, stride=window) for d in docs]
        rolling = sum(x.nats for x in per_doc) / math.log(2) / sum(x.bytes for x in per_doc)
        halves = score_texts(model, tokenizer, docs, seq_len=window)
        theirs_bpb = f"lm-eval loglikelihood_rolling {theirs[ROLLING]['bits_per_byte']:.6f}, " if python else ""
        print(f"\nperplexity of {len(docs)} texts of {' and '.join(str(x.tokens) for x in per_doc)} tokens, bits "
              f"per byte: {theirs_bpb}ours --stride {window} (= --seq-len) {rolling:.6f}, ours default stride "
              f"{window // 2} {halves.bits_per_byte:.6f}")
        if python:
            print("log-likelihood per text, |ours - lm-eval| / |lm-eval|: " + ", ".join(
                f"{abs(their_lls[ROLLING][i][0] + x.nats) / x.nats:.0e}" for i, x in enumerate(per_doc)))
            print(f"\nper-option log-likelihoods: largest |ours - lm-eval| = {worst:.1e} over {options} options; "
                  f"acc, acc_norm, acc_bytes: {'identical' if same else 'DIFFERENT'} (ours --no-bos vs lm-eval)")


if __name__ == "__main__":
    main()
