"""`minimind demo`: what runs end to end today, on the built-in data, on a laptop CPU in about a minute.
It trains the tokenizer, builds a tiny model, proves transformers loads it, and chats with it (untrained)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from minimind.chat import encode_chat
from minimind.checkpoint import load_model, save_model
from minimind.config import ModelConfig
from minimind.data.builtin import write_pretrain_jsonl
from minimind.generation import SamplingParams, generate
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import chars_per_token, train_tokenizer

HELD_OUT = {
    "English": "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "
               "The evil that men do lives after them; the good is oft interred with their bones.",
    "Chinese": "新华社北京一月三日电，国务院新闻办公室今天举行新闻发布会，介绍今年经济工作的主要任务和政策措施。"
               "这本书写得很好，内容丰富，推荐给大家。",
}


def run_demo(out: Path, quick: bool = False) -> None:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# MiniMind demo", ""]

    def say(text: str) -> None:
        print(text)
        lines.append(text)

    corpus = out / "data" / "pretrain.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    rows = write_pretrain_jsonl(corpus, max_chars=300_000 if quick else 4_000_000)
    say(f"1. Wrote {rows:,} built-in documents (Shakespeare; People's Daily 1998 and reviews) to {corpus}")

    vocab = 1200 if quick else 6400
    tokenizer = train_tokenizer([corpus], vocab_size=vocab, out_dir=out / "tokenizer", progress=not quick)
    say(f"2. Trained a {len(tokenizer):,}-token byte-level BPE tokenizer -> {out / 'tokenizer'}")
    for lang, text in HELD_OUT.items():
        say(f"   {lang}: {chars_per_token(tokenizer, text):.2f} characters per token on held-out text")

    cfg = ModelConfig.preset("tiny", vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model_dir = save_model(MiniMindForCausalLM(cfg), out / "model", tokenizer)
    say(f"3. Saved a randomly initialised `tiny` model ({cfg.num_parameters():,} parameters) -> {model_dir}")

    from transformers import AutoModelForCausalLM

    model = load_model(model_dir)
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(HELD_OUT["English"])])
    with torch.no_grad():
        diff = (model(ids).logits - theirs(ids).logits).abs().max().item()
    say(f"4. transformers loads it as {type(theirs).__name__}; max |logit difference| = {diff:.1e}")

    prompt, _ = encode_chat(tokenizer, [{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)
    reply = generate(model, tokenizer, [prompt], SamplingParams(max_new_tokens=32, temperature=0.85, seed=0))[0]
    say("5. The untrained model answers 'Who are you?' with noise, as it should before training:")
    say(f"   {reply.text!r}")
    say("")
    say("Training (pretrain, SFT) is not built yet, so this model has learned nothing. Chat with it anyway:")
    say(f"   .venv/bin/minimind chat --model {model_dir}")
    say(f"Done in {time.perf_counter() - start:.0f} s.")
    (out / "report.md").write_text("\n".join(lines) + "\n")
