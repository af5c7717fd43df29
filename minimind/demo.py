"""`minimind demo`: the whole pipeline on the built-in data with the `tiny` preset, on a laptop CPU in about
ten minutes: data -> tokenizer -> pretraining -> SFT -> evaluation -> sample chats -> runs/demo/report.md."""

from __future__ import annotations

import json
import time
from pathlib import Path

from minimind.chat import encode_chat, parse_assistant
from minimind.checkpoint import load_model
from minimind.data.builtin import write_builtin
from minimind.eval.perplexity import score_texts
from minimind.eval.probes import probe_accuracy
from minimind.generation import SamplingParams, generate
from minimind.tokenizer import chars_per_token, load_tokenizer, train_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.loop import train
from minimind.train.pretrain import PretrainStage
from minimind.train.sft import SFTStage

# Sized for 2 CPU cores. The machine's speed varies a lot, so each stage gets a time budget (seconds) and
# fits its number of steps to it (capped by the steps given). SFT gets the larger share: the measured
# skills (worked arithmetic, counting, units, identity) are taught there. `quick` is for tests.
# Arithmetic is the hardest skill to learn in minutes, so it gets three shares of the generated tasks.
FAMILIES = ("arithmetic", "counting", "arithmetic", "units", "identity", "arithmetic", "calculator", "converter")
FULL = dict(vocab=6400, pretrain_steps=3000, pretrain_budget=200, sft_steps=5000, sft_budget=400, seq_len=256,
            sft_seq_len=512, batch=16, probes=300, data=dict(sft_tasks=8000, pretrain_tasks=12000, families=FAMILIES))
QUICK = dict(vocab=800, pretrain_steps=30, pretrain_budget=0, sft_steps=30, sft_budget=0, seq_len=128,
             sft_seq_len=512, batch=8, probes=24,
             data=dict(pretrain_chars=200_000, pretrain_val_chars=20_000, sft_tasks=300, val_tasks=20,
                       heldout_tasks=40, rl_tasks=50, dpo_pairs=50))

CHATS = [
    ("Who are you?", False),
    ("你是谁？", False),
    ("What is 47 + 385?", True),
    ("计算 63 * 7 等于多少？", True),
    ("Convert 3 kilometers to meters.", False),
    ("Hello! How are you today?", False),
]
HELD_OUT_TEXT = {
    "English": "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "Chinese": "新华社北京一月三日电，国务院新闻办公室今天举行新闻发布会，介绍今年经济工作的主要任务。",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_demo(out: Path, quick: bool = False) -> None:
    size = QUICK if quick else FULL
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    report = ["# MiniMind demo", ""]

    def say(text: str = "") -> None:
        print(text, flush=True)
        report.append(text)

    def stage_time(label: str, t0: float) -> None:
        say(f"   ({label} took {time.perf_counter() - t0:.0f} s)")

    say("## 1. Built-in data")
    files = write_builtin(out / "data", seed=0, **size["data"])
    for name, path in files.items():
        say(f"- {name}: `{path}` ({sum(1 for _ in open(path, encoding='utf-8')):,} rows)")

    say("\n## 2. Tokenizer")
    t0 = time.perf_counter()
    tok_dir = out / "tokenizer"
    tokenizer = train_tokenizer([files["pretrain"], files["sft"]], vocab_size=size["vocab"], out_dir=tok_dir,
                                progress=False)
    say(f"- {len(tokenizer):,}-token byte-level BPE -> `{tok_dir}`")
    for lang, text in HELD_OUT_TEXT.items():
        say(f"- {lang}: {chars_per_token(tokenizer, text):.2f} characters per token on held-out text")
    stage_time("tokenizer", t0)

    common = dict(batch_size=size["batch"], workers=1, progress=not quick, log_every=25 if not quick else 10,
                  keep_last=1)
    say("\n## 3. Pretraining")
    t0 = time.perf_counter()
    pre_dir = train(TrainConfig(stage="pretrain", out=str(out / "pretrain"), data=str(files["pretrain"]),
                                val_data=str(files["pretrain_val"]), preset="tiny", tokenizer=str(tok_dir),
                                steps=size["pretrain_steps"], time_budget=size["pretrain_budget"], lr=2e-3,
                                warmup_steps=20, seq_len=size["seq_len"], **common), PretrainStage)
    say(f"- model -> `{pre_dir}`\n\n![pretraining loss](pretrain/loss.png)")
    stage_time("pretraining", t0)

    say("\n## 4. Supervised fine-tuning")
    t0 = time.perf_counter()
    sft_dir = train(TrainConfig(stage="sft", out=str(out / "sft"), data=str(files["sft"]),
                                val_data=str(files["sft_val"]), init_from=str(pre_dir), steps=size["sft_steps"],
                                time_budget=size["sft_budget"], lr=2e-3, warmup_steps=10,
                                seq_len=size["sft_seq_len"], **common), SFTStage)
    say(f"- model -> `{sft_dir}`\n\n![SFT loss](sft/loss.png)")
    stage_time("SFT", t0)

    say("\n## 5. Evaluation")
    t0 = time.perf_counter()
    model, tokenizer = load_model(sft_dir), load_tokenizer(sft_dir)
    val_pre, val_sft = last_val_loss(out / "pretrain"), last_val_loss(out / "sft")
    texts = [r["text"] for r in read_jsonl(files["pretrain_val"])][:200 if not quick else 10]
    bpb = score_texts(load_model(pre_dir), tokenizer, texts, seq_len=size["seq_len"]).bits_per_byte
    tasks = [r for r in read_jsonl(files["tasks_heldout"]) if r.get("task") != "calculator"][:size["probes"]]
    probes = probe_accuracy(model, tokenizer, tasks)
    say("| measure | value |")
    say("|---|---|")
    say(f"| pretraining validation loss (nats/token) | {val_pre:.3f} |")
    say(f"| bits per byte, held-out text (pretrained model) | {bpb:.3f} |")
    say(f"| SFT validation loss (nats/token, assistant tokens) | {val_sft:.3f} |")
    say(f"| held-out task accuracy (greedy; thinking on for worked-step tasks) | {probes.accuracy:.1%} "
        f"({probes.correct}/{probes.total}) |")
    for family, acc in probes.family_accuracy().items():
        n = probes.by_family[family][1]
        say(f"| - {family} | {acc:.1%} of {n} |")
    stage_time("evaluation", t0)

    say("\n## 6. Sample chats (greedy)")
    for question, think in CHATS:
        ids, _ = encode_chat(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True,
                             enable_thinking=think)
        text = generate(model, tokenizer, [ids], SamplingParams(max_new_tokens=120, temperature=0))[0].text
        reply = parse_assistant(("<think>\n" if think else "") + text)
        say(f"\n**user:** {question}" + (" (thinking on)" if think else ""))
        if reply["reasoning_content"]:
            say(f"> thinking: {reply['reasoning_content']!r}")
        say(f"**minimind:** {reply['content']}")

    say(f"\nDone in {time.perf_counter() - start:.0f} s. Chat with it: `.venv/bin/minimind chat --model {sft_dir}`")
    (out / "report.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    print(f"report: {out / 'report.md'}")


def last_val_loss(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = [r["val_loss"] for r in rows if "val_loss" in r]
    return values[-1] if values else float("nan")
