"""`minimind demo`: the whole pipeline on the built-in data with the `tiny` preset, on a laptop CPU in about
ten minutes: data -> tokenizer -> pretraining -> SFT -> evaluation -> sample chats -> runs/demo/report.md."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from minimind.chat import encode_chat, parse_assistant, thinks_by_default
from minimind.checkpoint import load_model
from minimind.data.builtin import write_builtin, write_pretrain_jsonl
from minimind.data.clean import clean
from minimind.data.parallel import cpus
from minimind.data.tasks import TOOL_FAMILIES
from minimind.eval.perplexity import score_texts
from minimind.eval.preference import mistake_pairs, pair_margins
from minimind.eval.probes import probe_accuracy, tool_use
from minimind.generation import SamplingParams, generate
from minimind.recipes.distill import heldout_kl
from minimind.recipes.lora import lora_example, side_by_side_markdown
from minimind.recipes.report import Report
from minimind.recipes.rl import read_jsonl, rl_example
from minimind.tokenizer import chars_per_token, load_tokenizer, train_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.distill import DistillStage
from minimind.train.dpo import DPOStage
from minimind.train.loop import train
from minimind.train.pretrain import PretrainStage
from minimind.train.sft import SFTStage

# Fixed step counts, so the recipe trains the same on any machine and a faster one only finishes sooner: sized
# to about 12 minutes on 2 CPU cores. `--time-budget S` fits the training stages to S seconds instead (split as
# BUDGET_SHARE says, up to TIME_BUDGET_CAP times the fixed counts). SFT gets most of the time: the measured
# skills (worked arithmetic, counting, units, identity) are taught there.
# Arithmetic is the slowest skill to arrive: held-out accuracy climbs steeply with the share of SFT it gets
# (measured from one pretrained model, 480 s of one-thread SFT: 66% with all of it, 17% with three quarters of
# the tokens, 3% with two fifths). So it gets ten of the fourteen task shares, the chatterbot dialogues are cut
# to 800, and pretraining carries a drill of the one-column facts its worked steps are made of. The calculator
# tasks get one share: each of their rows spends ~330 tokens on the tool definitions. The unit converter tool is
# left out (`minimind data builtin --families` can put it in): its questions are the units family's, answered a
# second way. Both stages train with Muon: at the same rate it reached an SFT validation loss of 1.67 in 300
# steps where AdamW was at 2.16 (README, Optimizers, for pretraining).
FAMILIES = ("arithmetic",) * 10 + ("counting", "units", "identity", "calculator")
FULL = dict(corpus_chars=None, vocab=6400, pretrain_steps=120, sft_steps=1600, optimizer="muon",
            seq_len=256, sft_seq_len=512, batch=16, probes=600,
            data=dict(sft_tasks=8000, dialogues_cap=800, pretrain_tasks=12000, pretrain_drill=1500, heldout_tasks=600,
                      families=FAMILIES),
            # --all: the post-training stages
            lora_steps=100, dpo_steps=120, distill_steps=120, rl_budget=780)
BUDGET_SHARE = {"pretrain": 0.18, "sft": 0.82}
TIME_BUDGET_CAP = 3
QUICK = dict(corpus_chars=300_000, vocab=800, pretrain_steps=30, sft_steps=30, optimizer="muon",
             seq_len=128, sft_seq_len=512, batch=8, probes=24,
             data=dict(pretrain_chars=200_000, pretrain_val_chars=20_000, sft_tasks=300, val_tasks=20,
                       heldout_tasks=40, rl_tasks=50, dpo_pairs=50, pretrain_drill=20),
             lora_steps=4, dpo_steps=4, distill_steps=4, rl_budget=0)

CHATS = ["Who are you?", "你是谁？", "What is 47 + 38?", "计算 63 - 27 等于多少？", "Convert 3 kilometers to meters.",
         "Hello! How are you today?"]
HELD_OUT_TEXT = {
    "English": "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "Chinese": "新华社北京一月三日电，国务院新闻办公室今天举行新闻发布会，介绍今年经济工作的主要任务。",
}


def run_demo(out: Path, quick: bool = False, all_stages: bool = False, seed: int = 0,
             time_budget: float = 0.0, optimizer: str | None = None) -> None:
    """seed: the data's and the training's (initial weights, batch order); time_budget: seconds for pretraining
    and SFT together, fitted to this machine's speed, instead of the fixed step counts; optimizer: that of
    pretraining and SFT instead of the recipe's."""
    size = QUICK if quick else FULL
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    say = Report("MiniMind demo")

    def stage_time(label: str, t0: float) -> None:
        say(f"   ({label} took {time.perf_counter() - t0:.0f} s)")

    say("## 1. Built-in data, cleaned")
    t0 = time.perf_counter()
    raw = out / "data" / "corpus_raw.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    write_pretrain_jsonl(raw, max_chars=size["corpus_chars"])
    cleaned = clean([raw], out / "data" / "clean", workers=cpus())
    removed = ", ".join(f"{rule} {n:,}" for rule, n in cleaned.removed.items())
    say(f"- the packages' text: {cleaned.rows_in:,} documents, {cleaned.rows_out:,} kept after cleaning; removed: "
        f"{removed} (examples and the length plot: `{out / 'data' / 'clean' / 'report.md'}`)")
    stage_time("cleaning", t0)
    files = write_builtin(out / "data", seed=seed, documents=out / "data" / "clean" / "clean.jsonl", **size["data"])
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
                  keep_last=1, seed=seed, optimizer=optimizer or size["optimizer"])
    steps = {stage: size[f"{stage}_steps"] * (TIME_BUDGET_CAP if time_budget else 1) for stage in BUDGET_SHARE}
    budget = {stage: share * time_budget for stage, share in BUDGET_SHARE.items()}
    say("\n## 3. Pretraining")
    t0 = time.perf_counter()
    pre_dir = train(TrainConfig(stage="pretrain", out=str(out / "pretrain"), data=str(files["pretrain"]),
                                val_data=str(files["pretrain_val"]), preset="tiny", tokenizer=str(tok_dir),
                                steps=steps["pretrain"], time_budget=budget["pretrain"], lr=2e-3,
                                warmup_steps=20, seq_len=size["seq_len"], **common), PretrainStage)
    say(f"- model -> `{pre_dir}` ({speed(out / 'pretrain')})\n\n![pretraining loss](pretrain/loss.png)")
    stage_time("pretraining", t0)

    say("\n## 4. Supervised fine-tuning")
    t0 = time.perf_counter()
    sft_dir = train(TrainConfig(stage="sft", out=str(out / "sft"), data=str(files["sft"]),
                                val_data=str(files["sft_val"]), init_from=str(pre_dir), steps=steps["sft"],
                                time_budget=budget["sft"], lr=2e-3, warmup_steps=10,
                                seq_len=size["sft_seq_len"], **common), SFTStage)
    say(f"- model -> `{sft_dir}` ({speed(out / 'sft')})\n\n![SFT loss](sft/loss.png)")
    stage_time("SFT", t0)

    say("\n## 5. Evaluation")
    t0 = time.perf_counter()
    model, tokenizer = load_model(sft_dir), load_tokenizer(sft_dir)
    val_pre, val_sft = last_val_loss(out / "pretrain"), last_val_loss(out / "sft")
    texts = [r["text"] for r in read_jsonl(files["pretrain_val"])][:200 if not quick else 10]
    bpb = score_texts(load_model(pre_dir), tokenizer, texts, seq_len=size["seq_len"]).bits_per_byte
    heldout = read_jsonl(files["tasks_heldout"])
    text_tasks = [r for r in heldout if r.get("task") not in TOOL_FAMILIES][:size["probes"]]
    probes = probe_accuracy(model, tokenizer, text_tasks)
    tools = tool_use(model, tokenizer, [r for r in heldout if r.get("task") in TOOL_FAMILIES][:size["probes"]])
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
    say(f"| well-formed thinking (one closed think block, an answer, a stop) | {probes.format_rate:.1%} "
        f"of {probes.thought} |")
    say(f"| tool tasks (the tools really run): valid call / correct tool use / right answer | "
        f"{tools['valid_call_rate']:.1%} / {tools['correct_tool_use']:.1%} / {tools['answer_accuracy']:.1%} "
        f"of {tools['n']} |")
    stage_time("evaluation", t0)

    # Asked as `minimind chat`, `webui` and `serve` ask it, with the model's default: SFT found most of its
    # conversations thinking, so its template leaves the think block to the model (empty for a greeting).
    default = "the model writes its own think block" if thinks_by_default(tokenizer) else "off"
    say(f"\n## 6. Sample chats (greedy; thinking as the model's default: {default})")
    for question in CHATS:
        ids, _ = encode_chat(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
        text = generate(model, tokenizer, [ids], SamplingParams(max_new_tokens=120, temperature=0))[0].text
        reply = parse_assistant(text)
        say(f"\n**user:** {question}")
        if reply["reasoning_content"]:
            say(f"> thinking: {reply['reasoning_content']!r}")
        say(f"**minimind:** {reply['content']}")

    if all_stages:
        post_training(out, files, pre_dir, sft_dir, size, say, text_tasks, probes.accuracy)
    say(f"\nDone in {time.perf_counter() - start:.0f} s. Chat with it: `.venv/bin/minimind chat --model {sft_dir}`")
    say.write(out / "report.md")


def post_training(out: Path, files: dict[str, Path], pre_dir: Path, sft_dir: Path, size: dict, say,
                  text_tasks: list[dict], sft_accuracy: float) -> None:
    """`minimind demo --all`: LoRA, DPO, distillation and RL from the SFT model, each with its measured effect.
    text_tasks / sft_accuracy: the held-out tool-free tasks and the SFT model's accuracy on them (section 5)."""
    tokenizer = load_tokenizer(sft_dir)
    common = dict(workers=1, progress=False, log_every=10, keep_last=1)

    say("\n## 7. LoRA: a new identity in an adapter")
    t0 = time.perf_counter()
    rows = lora_example(sft_dir, out / "lora", steps=size["lora_steps"])
    say(f"An adapter (`{out / 'lora' / 'adapter'}`, PEFT layout) trained on generated rows that name the model "
        "LoRA-Mind; greedy replies of the base model and of the base model with the adapter:\n")
    say(side_by_side_markdown(rows))
    stage_time = lambda label: say(f"   ({label} took {time.perf_counter() - t0:.0f} s)")  # noqa: E731
    stage_time("LoRA")

    say("\n## 8. DPO on preference pairs")
    t0 = time.perf_counter()
    sft_model = load_model(sft_dir)
    # Besides the built-in pairs, the SFT model's own wrong answers: on held-in prompts to train on, on held-out
    # prompts to measure with.
    train_pairs = read_jsonl(files["dpo"])
    own = mistake_pairs(sft_model, tokenizer, train_pairs)
    val_pairs = read_jsonl(files["dpo_val"])
    val_pairs += mistake_pairs(sft_model, tokenizer, val_pairs)
    dpo_data = out / "dpo_data.jsonl"
    dpo_data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train_pairs + own), encoding="utf-8")
    say(f"Training pairs: {len(train_pairs)} built-in, {len(own)} of the SFT model's own wrong answers on held-in "
        "prompts.")
    before = pair_margins(sft_model, tokenizer, val_pairs, per_token=True)
    dpo_dir = train(TrainConfig(stage="dpo", out=str(out / "dpo"), data=str(dpo_data), init_from=str(sft_dir),
                                steps=size["dpo_steps"], lr=2e-4, dpo_beta=0.1,
                                # without the NLL term the chosen replies lose likelihood too, and the tuned
                                # model answered 32.5% -> 18.2% of the held-out tasks (29.0% with it)
                                dpo_nll_weight=1.0, batch_size=8, seq_len=size["sft_seq_len"], warmup_steps=2,
                                **common), DPOStage)
    after = pair_margins(load_model(dpo_dir), tokenizer, val_pairs, per_token=True)
    say("Held-out pairs (right vs wrong or tool-less answers, concise vs repetitive replies, the reference reply vs "
        "the SFT model's own wrong one), scored by the per-token log-probability margin of chosen over rejected:\n")
    say("| model | preference accuracy | mean margin (nats/token) |\n|---|---|---|")
    for name, margins in (("SFT", before), ("SFT + DPO", after)):
        say(f"| {name} | {sum(m > 0 for m in margins) / len(margins):.1%} | {sum(margins) / len(margins):.3f} |")
    say("\nBy kind of pair (pairs ranked right, SFT -> SFT + DPO): " + "; ".join(
        f"{kind} {b}/{n} -> {a}/{n}" for kind, (b, a, n) in right_by_kind(val_pairs, before, after).items()))
    # Ranking pairs better is not answering better: say what the tuned model does on the held-out tasks.
    dpo_accuracy = probe_accuracy(load_model(dpo_dir), tokenizer, text_tasks).accuracy
    say(f"\nHeld-out task accuracy (greedy): SFT {sft_accuracy:.1%}, SFT + DPO {dpo_accuracy:.1%} "
        f"({len(text_tasks)} tasks).")
    say(f"\nDPO training: {speed(out / 'dpo')}.")
    stage_time("DPO")

    say("\n## 9. Distillation: the SFT model teaches the pretrained one")
    t0 = time.perf_counter()
    teacher = sft_model
    kl_before = heldout_kl(load_model(pre_dir), teacher, tokenizer, files["sft_val"])
    student_dir = train(TrainConfig(stage="distill", out=str(out / "distill"), data=str(files["sft"]),
                                    init_from=str(pre_dir), teacher=str(sft_dir), steps=size["distill_steps"],
                                    lr=2e-3, batch_size=16,
                                    seq_len=size["sft_seq_len"], warmup_steps=5, **common), DistillStage)
    kl_after = heldout_kl(load_model(student_dir), teacher, tokenizer, files["sft_val"])
    say(f"Held-out KL(teacher || student) per assistant token: {kl_before:.3f} before, {kl_after:.3f} after "
        f"white-box distillation (cross-entropy plus temperature-scaled KL on the assistant tokens); "
        f"{speed(out / 'distill')}.")
    stage_time("distillation")

    say("\n## 10. Reinforcement learning: GRPO on tasks, agentic RL on tool use")
    if not size["rl_budget"]:
        say("(skipped in the quick run)")
        return
    figures = rl_example(sft_dir, out / "data", out / "rl", budget_s=size["rl_budget"])
    g, a = figures["grpo"], figures["agent"]
    say(f"GRPO on held-in {', '.join(g['families'])} tasks ({g['steps']} steps, {g['seconds']} s): held-out "
        f"accuracy {g['before']:.1%} -> {g['after']:.1%} ({g['n']} tasks).")
    say(f"Agentic RL on held-in calculator tasks ({a['steps']} steps, {a['seconds']} s): correct calculator use "
        f"{a['before']['correct_tool_use']:.1%} -> {a['after']['correct_tool_use']:.1%}, right final answer "
        f"{a['before']['answer_accuracy']:.1%} -> {a['after']['answer_accuracy']:.1%} ({a['after']['n']} tasks).")
    say(f"   (RL took {figures['seconds']} s)")


def right_by_kind(pairs: list[dict], before: list[float], after: list[float]) -> dict[str, tuple[int, int, int]]:
    """{task family and pair kind: (pairs ranked right before, after, pairs)}, to show where DPO has work left."""
    counts: dict[str, list[int]] = {}
    for pair, b, a in zip(pairs, before, after):
        c = counts.setdefault(f"{pair.get('task', 'other')} {pair.get('kind', 'answer')}", [0, 0, 0])
        c[0] += b > 0
        c[1] += a > 0
        c[2] += 1
    return {k: tuple(v) for k, v in sorted(counts.items())}


def speed(run: Path) -> str:
    """A training stage's steps, and its median tokens/s and MFU over its logged steps (the first, with its
    warm-up, left out)."""
    logged = read_jsonl(run / "metrics.jsonl")
    steps = f"{max((r['step'] for r in logged if 'step' in r), default=0):,} steps"
    rows = [r for r in logged if "tokens_per_s" in r][1:]
    if not rows:
        return f"{steps}, speed not logged"
    mfu = [r["mfu"] for r in rows if r.get("mfu") is not None]
    return (f"{steps}, {statistics.median(r['tokens_per_s'] for r in rows):,.0f} tokens/s, MFU "
            + (f"{100 * statistics.median(mfu):.1f}%" if mfu else "peak unknown"))


def last_val_loss(run: Path) -> float:
    rows = read_jsonl(run / "metrics.jsonl")
    values = [r["val_loss"] for r in rows if "val_loss" in r]
    return values[-1] if values else float("nan")
