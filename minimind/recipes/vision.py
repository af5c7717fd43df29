"""`minimind demo --vision`: a vision-language model from the demo's SFT model on the built-in images, trained on
a 2-core CPU in minutes; held-out accuracy per question kind next to chance, and sample images with the model's
answers, in runs/demo/vision/report.md. `run_vision_demo(Path("runs/demo/vision"), Path("runs/demo/sft/model"))`."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from minimind import MiniMindError
from minimind.chat import encode_chat
from minimind.checkpoint import load_model
from minimind.data.images import CHANCE, is_correct, write_vision_builtin
from minimind.data.vision import preprocess
from minimind.generation import SamplingParams, generate
from minimind.recipes.report import Report
from minimind.tokenizer import load_tokenizer
from minimind.train.config import TrainConfig
from minimind.train.loop import train
from minimind.train.vision import VisionPretrainStage, VisionSFTStage, VisionTowerStage


def read_rows(path) -> list[dict]:
    """The rows of a built-in image set (Parquet) as dicts: conversations (parsed), images, kind, lang, answer."""
    import json

    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    for r in rows:
        r["conversations"] = json.loads(r["conversations"])
        image = r.pop("image_bytes")
        r["images"] = image if isinstance(image, list) else [image]
    return rows


@torch.no_grad()
def answer(model, tokenizer, rows: list[dict], batch: int = 32, max_new_tokens: int = 16) -> list[str]:
    """The model's greedy reply to each row's first user turn (its question about its image)."""
    model.eval()
    spec, per = model.vision.image_spec(), model.image_tokens
    replies: list[str] = []
    for lo in range(0, len(rows), batch):
        chunk = rows[lo:lo + batch]
        prompts = [encode_chat(tokenizer, r["conversations"][:1], add_generation_prompt=True, image_tokens=per)[0]
                   for r in chunk]
        images = {"pixel_values": preprocess([im for r in chunk for im in r["images"]], **spec),
                  "image_counts": torch.tensor([len(r["images"]) for r in chunk])}
        out = generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0),
                       images=images)
        replies += [c.text.strip() for c in out]
    return replies


def accuracy_by_kind(rows: list[dict], replies: list[str]) -> dict[str, tuple[int, int]]:
    """{question kind: (right, asked)}, kinds in order of first appearance."""
    counts: dict[str, list[int]] = {}
    for row, reply in zip(rows, replies):
        c = counts.setdefault(row["kind"], [0, 0])
        c[0] += is_correct(row, reply)
        c[1] += 1
    return {k: (c[0], c[1]) for k, c in sorted(counts.items(), key=lambda kv: list(CHANCE).index(kv[0]))}


# The demo's recipe: fixed step counts, so a seed takes the same steps on any machine (about 7 minutes a seed on
# one thread of the 2-core machine, 4.4 on its two). First the tower alone (vision-tower): learning from scratch
# only through the decoder's answers, it learned colour and little else (shape, count, position and size at
# chance), while a head per scene label (count, each object's shape, colour, size and place) teaches it counts and
# shapes in a minute.
# It then stays frozen: trained on through the decoder (at vision_lr) it lost much of what the labels taught it
# (one seed: shape 38% against 57% frozen, count 52% against 63%). The whole decoder trains (freeze_llm 0) at a
# small rate beside the projector at a larger one: with the decoder frozen (MiniMind-V's freeze_llm 2), the only
# way to lower the loss at first is to turn the image tokens into a soft prompt for the new answer format, the
# same for every image, and AdamW takes full-size steps along that steady gradient, so the image features
# collapse to a constant within a few steps. Captions next (each names a scene's colours, shapes, sizes and
# places), then the questions. 64 px images, 8x8 patches (32 px with 4x4 patches did no better: one seed).
KINDS = ("shape", "colour", "count", "position", "size")
FULL = dict(captions=4000, questions=6000, heldout=300, tower_steps=600, tower_batch=32, tower_lr=2e-3,
            pretrain_steps=300, sft_steps=1000, lr=5e-4, vision_lr=1e-3, batch=8, samples=5)
QUICK = dict(captions=32, questions=32, heldout=10, tower_steps=2, tower_batch=4, tower_lr=2e-3, pretrain_steps=2,
             sft_steps=2, lr=5e-4, vision_lr=1e-3, batch=4, samples=2)
SEQ_LEN = 160  # a question or a caption with its 64 image tokens (the longest caption row is ~130)


def train_vision(sft_dir: Path, data: dict[str, Path], out: Path, size: dict, seed: int, quick: bool) -> Path:
    """The three stages from the language model `sft_dir`; returns the vision-sft model directory."""
    # Batches are drawn at random, not grouped by length: rows of one length are often one kind of question
    # in one language, and the padding saved is small beside the 64 image tokens.
    run = dict(seq_len=SEQ_LEN, workers=1, progress=not quick, keep_last=1, seed=seed, group_by_length=False)
    # The tower learns from the questions' images (training split only), labelled from their scenes.
    tower = train(TrainConfig(stage="vision-tower", out=str(out / "tower"), data=str(data["vision_sft"]),
                              init_from=str(sft_dir), steps=size["tower_steps"], batch_size=size["tower_batch"],
                              lr=size["tower_lr"], warmup_steps=20, log_every=100, **run), VisionTowerStage)
    common = dict(batch_size=size["batch"], log_every=50, train_encoder=False, freeze_llm=0, lr=size["lr"],
                  vision_lr=size["vision_lr"], warmup_steps=10, **run)
    pre = train(TrainConfig(stage="vision-pretrain", out=str(out / "pretrain"), data=str(data["vision_pretrain"]),
                            init_from=str(tower), steps=size["pretrain_steps"], **common), VisionPretrainStage)
    return train(TrainConfig(stage="vision-sft", out=str(out / "sft"), data=str(data["vision_sft"]),
                             init_from=str(pre), steps=size["sft_steps"], **common), VisionSFTStage)


def run_vision_demo(out: Path, sft_dir: Path, quick: bool = False, seeds: tuple[int, ...] = (0,)) -> dict:
    """Built-in images -> vision-pretrain -> vision-sft (per seed) -> held-out accuracy per kind next to chance,
    sample images with the answers -> out/report.md. Returns {kind: [accuracy per seed]}."""
    size = QUICK if quick else FULL
    if not (Path(sft_dir) / "config.json").is_file():
        raise MiniMindError(f"{sft_dir}: no model directory; run `minimind demo` first (it writes "
                            "runs/demo/sft/model), or pass --vision-from DIR")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    say = Report("MiniMind demo: vision")

    data = write_vision_builtin(out / "data", seed=0, size=64, sft_rows=size["questions"],
                               caption_rows=size["captions"], heldout_rows=size["heldout"], kinds=KINDS)
    say(f"From `{sft_dir}`: the tiny SigLIP tower (64x64 images, 8x8 patches -> 64 image tokens) trained from "
        f"scratch with a new projector. Built-in images ({', '.join(KINDS)}; English and Chinese): "
        f"{size['captions']:,} captions, {size['questions']:,} questions, {size['heldout']:,} held-out questions "
        "on images training never sees.\n")
    say(f"1. vision-tower: the tower alone on the questions' images, a head per scene label ({size['tower_steps']} "
        f"steps of {size['tower_batch']} images at lr {size['tower_lr']:g}; heads dropped, tower frozen after); "
        f"2. vision-pretrain on the captions, then 3. vision-sft on the questions ({size['pretrain_steps']} and "
        f"{size['sft_steps']} steps of {size['batch']} rows): the projector at lr {size['vision_lr']:g}, "
        f"the whole decoder at lr {size['lr']:g} (freeze_llm 0)\n")
    rows = read_rows(data["vision_heldout"])
    scores: dict[str, list[float]] = {k: [] for k in KINDS}
    for seed in seeds:
        model_dir = train_vision(sft_dir, data, out / f"seed{seed}", size, seed, quick)
        model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
        replies = answer(model, tokenizer, rows)
        accuracy = accuracy_by_kind(rows, replies)
        for kind, (right, asked) in accuracy.items():
            scores[kind].append(right / asked)
        if len(seeds) > 1:
            say(f"seed {seed}: " + ", ".join(f"{kind} {right / asked:.0%}" for kind, (right, asked) in accuracy.items())
                + "\n")
    say(f"Held-out accuracy (greedy replies; {len(seeds)} seed{'s' * (len(seeds) > 1)}"
        + (": median and range" if len(seeds) > 1 else "") + "):\n")
    say("| kind | questions | accuracy | chance |\n|---|---|---|---|")
    asked = Counter(r["kind"] for r in rows)
    for kind in KINDS:
        s = scores[kind]
        spread = f" ({min(s):.0%}-{max(s):.0%})" if len(s) > 1 else ""
        say(f"| {kind} | {asked[kind]} | {statistics.median(s):.0%}{spread} | {CHANCE[kind]:.0%} |")
    say("\nSamples (the last seed's model, greedy):\n")
    say(samples_markdown(rows, replies, out, size["samples"]))
    say(f"\nDone in {time.perf_counter() - start:.0f} s. Model: `{model_dir}`")
    say.write(out / "report.md")
    return scores


def samples_markdown(rows: list[dict], replies: list[str], out: Path, per_kind: int) -> str:
    """A table of held-out images (written as PNG files beside the report) with question, answer and reply:
    the first `per_kind` rows of each kind."""
    (out / "samples").mkdir(exist_ok=True)
    lines = ["| image | question | right answer | model | |", "|---|---|---|---|---|"]
    shown: Counter = Counter()
    for i, (row, reply) in enumerate(zip(rows, replies)):
        if shown[row["kind"]] >= per_kind:
            continue
        shown[row["kind"]] += 1
        name = f"samples/{i:04d}_{row['kind']}.png"
        (out / name).write_bytes(row["images"][0])
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        question = cell(row["conversations"][0]["content"].replace("<image>", "").strip())
        lines.append(f"| ![{row['kind']}]({name}) | {question} | {cell(row['answer'])} | {cell(reply)} | "
                     f"{'right' if is_correct(row, reply) else 'wrong'} |")
    return "\n".join(lines)
