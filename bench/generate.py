"""Decode and prefill speed: our generation against transformers' `generate` on the same weights, in the
same run, interleaved, reported as a ratio; ours also with weight-only int8 (`--quantize int8`).
`python bench/generate.py [--presets minimind2-small] [--batches 1]`"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from minimind.checkpoint import load_model, save_model
from minimind.config import ModelConfig
from minimind.device import pick_dtype
from minimind.generation import SamplingParams, generate
from minimind.model import MiniMindForCausalLM
from minimind.quant import quantize_int8


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
        models = {
            "ours fp32": load_model(d),
            "ours bf16": load_model(d, dtype=torch.bfloat16),
            "ours int8": quantize_int8(load_model(d)),
            "hf fp32": AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(),
            "hf bf16": AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval(),
        }
    for key, m in models.items():
        if key.startswith("ours"):
            m.config.eos_token_id = -1
        else:
            m.generation_config.eos_token_id = None
    default = f"ours {'bf16' if pick_dtype('auto', torch.device('cpu')) == torch.bfloat16 else 'fp32'}"
    print(f"\n{name} ({cfg.num_parameters() / 1e6:.1f}M parameters), prompt {prompt_len}, {new_tokens} new tokens, "
          f"median of {repeats}; our default dtype here is {default.split()[1]}")
    g = torch.Generator().manual_seed(1)
    for batch in batches:
        prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
        runs: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(repeats):  # interleaved, so machine noise hits every contender alike
            for key, m in models.items():
                fn = ours_decode if key.startswith("ours") else hf_decode
                runs[key].append(timed(lambda fn=fn, m=m, p=prompts: fn(m, p, new_tokens)))
        speed = {k: batch * new_tokens / statistics.median(v) for k, v in runs.items()}
        print(f"  decode batch {batch}: " + " | ".join(f"{k} {v:6.1f}" for k, v in speed.items()) + " tok/s")
        print(f"    ratios: same dtype fp32 {speed['ours fp32'] / speed['hf fp32']:.2f}x, "
              f"bf16 {speed['ours bf16'] / speed['hf bf16']:.2f}x; "
              f"defaults ({default} vs hf fp32) {speed[default] / speed['hf fp32']:.2f}x; "
              f"int8 vs hf fp32 {speed['ours int8'] / speed['hf fp32']:.2f}x, "
              f"vs hf's fastest {speed['ours int8'] / max(speed['hf fp32'], speed['hf bf16']):.2f}x")
    ids = torch.randint(3, cfg.vocab_size, (1, 512), generator=g)
    pre: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(repeats):
            for key, m in models.items():
                pre[key].append(timed(lambda m=m: m(ids, logits_to_keep=1)))
    speed = {k: 512 / statistics.median(v) for k, v in pre.items()}
    print("  prefill 512: " + " | ".join(f"{k} {v:6.0f}" for k, v in speed.items()) + " tok/s")
    print(f"    ratios: fp32 {speed['ours fp32'] / speed['hf fp32']:.2f}x, "
          f"bf16 {speed['ours bf16'] / speed['hf bf16']:.2f}x")


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
