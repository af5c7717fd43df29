"""Decode and prefill speed: our generation against transformers' `generate` on the same weights, in the
same run, interleaved, reported as a ratio. `python bench/generate.py [--presets minimind2-small] [--quick]`"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from minimind.checkpoint import load_model, save_model
from minimind.config import ModelConfig
from minimind.generation import SamplingParams, generate
from minimind.model import MiniMindForCausalLM


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours_decode(model, prompts, new_tokens):
    # eos is made unreachable so every run decodes exactly `new_tokens` tokens, as min_new_tokens does for HF
    out = generate(model, None, prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0))
    assert all(len(c.token_ids) == new_tokens for c in out)


def hf_decode(model, prompts, new_tokens):
    ids = torch.tensor(prompts)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new_tokens


def bench_preset(name: str, batches: list[int], prompt_len: int, new_tokens: int, repeats: int) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.preset(name)
    with tempfile.TemporaryDirectory() as d:
        save_model(MiniMindForCausalLM(cfg), d)
        ours = load_model(d)
        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        ours_bf16 = load_model(d, dtype=torch.bfloat16)
    ours.config.eos_token_id = ours_bf16.config.eos_token_id = -1
    theirs.generation_config.eos_token_id = None
    print(f"\n{name} ({cfg.num_parameters() / 1e6:.1f}M parameters), prompt {prompt_len}, {new_tokens} new tokens, "
          f"median of {repeats}, fp32 unless marked")
    g = torch.Generator().manual_seed(1)
    for batch in batches:
        prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
        runs = {"ours": [], "ours bf16": [], "transformers": []}
        for _ in range(repeats):  # interleaved, so machine noise hits both sides alike
            runs["ours"].append(timed(lambda p=prompts: ours_decode(ours, p, new_tokens)))
            runs["transformers"].append(timed(lambda p=prompts: hf_decode(theirs, p, new_tokens)))
            runs["ours bf16"].append(timed(lambda p=prompts: ours_decode(ours_bf16, p, new_tokens)))
        speed = {k: batch * new_tokens / statistics.median(v) for k, v in runs.items()}
        print(f"  decode batch {batch}: ours {speed['ours']:7.1f} tok/s | transformers {speed['transformers']:7.1f} "
              f"tok/s | ratio {speed['ours'] / speed['transformers']:.2f}x | ours bf16 {speed['ours bf16']:7.1f} "
              f"tok/s ({speed['ours bf16'] / speed['transformers']:.2f}x)")
    ids = torch.randint(3, cfg.vocab_size, (1, 512), generator=g)
    pre = {"ours": [], "transformers": []}
    with torch.inference_mode():
        for _ in range(repeats):
            pre["ours"].append(timed(lambda: ours(ids, logits_to_keep=1)))
            pre["transformers"].append(timed(lambda: theirs(ids, logits_to_keep=1)))
    speed = {k: 512 / statistics.median(v) for k, v in pre.items()}
    print(f"  prefill 512: ours {speed['ours']:7.0f} tok/s | transformers {speed['transformers']:7.0f} tok/s | "
          f"ratio {speed['ours'] / speed['transformers']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["minimind2-small", "minimind-3"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.presets:
        bench_preset(name, args.batches, args.prompt_len, args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
