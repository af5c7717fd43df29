"""Decode and prefill speed: our generation, eager and compiled (the fixed-shape step under torch.compile), against
transformers' `generate` and, when `llama_cpp` is importable, llama.cpp on the same weights exported with
`minimind export gguf` as f32 and q8_0; in the same run, interleaved, reported as ratios.
`python bench/generate.py [--presets minimind2-small] [--batches 1 8] [--only ours llama]`"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
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


class Ours:
    def __init__(self, model, compile: bool) -> None:
        self.model, self.compile = model, compile
        model.config.eos_token_id = -1  # every run decodes exactly `new_tokens` tokens

    def decode(self, prompts, new_tokens):
        out = generate(self.model, None, prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0),
                       compile=self.compile)
        assert all(len(c.token_ids) == new_tokens for c in out)

    def prefill(self, ids):
        with torch.inference_mode():
            self.model(ids, logits_to_keep=1)


class HF:
    def __init__(self, model) -> None:
        self.model = model
        model.generation_config.eos_token_id = None

    def decode(self, prompts, new_tokens):
        ids = torch.tensor(prompts)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new_tokens

    def prefill(self, ids):
        with torch.inference_mode():
            self.model(ids, logits_to_keep=1)


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: a batch of B prompts decodes as B sequences of one context,
    greedy (argmax of each row's logits), which is how llama.cpp batches independent requests."""

    def __init__(self, path: Path, batch: int, n_ctx: int, threads: int) -> None:
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        mparams.use_extra_bufts = False  # ggml's AMX repack dies with SIGILL on these CPUs (DESIGN.md section 5)
        self.model = L.llama_model_load_from_file(str(path).encode(), mparams)
        cparams = L.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_seq_max = n_ctx * batch, n_ctx * batch, batch
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_ctx * batch, 0, batch)

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """entries (token, position, sequence, wants logits); returns the logits rows asked for, in order."""
        b, L = self.batch, self.L
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        if L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return [np.ctypeslib.as_array(ctypes.cast(L.llama_get_logits_ith(self.ctx, i), ctypes.POINTER(ctypes.c_float)),
                                      shape=(self.n_vocab,)) for i, e in enumerate(entries) if e[3]]

    def decode(self, prompts, new_tokens):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        entries = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        logits = self._run(entries)
        pos = [len(p) for p in prompts]
        for _ in range(new_tokens):
            tokens = [int(row.argmax()) for row in logits]
            logits = self._run([(t, pos[s], s, True) for s, t in enumerate(tokens)])
            pos = [p + 1 for p in pos]

    def prefill(self, ids):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        p = ids[0].tolist()
        self._run([(t, j, 0, j == len(p) - 1) for j, t in enumerate(p)])


def random_model_dir(cfg: ModelConfig, out: Path) -> Path:
    """Random weights with a small tokenizer (GGUF export needs one; the benchmark feeds random ids)."""
    from minimind.data.builtin import english_documents
    from minimind.tokenizer import train_tokenizer

    text, size = [], 0
    for doc in english_documents():
        text.append(doc)
        size += len(doc)
        if size > 300_000:
            break
    (out / "text.txt").write_text("\n".join(text), encoding="utf-8")
    tok = train_tokenizer([out / "text.txt"], vocab_size=min(cfg.vocab_size, 2000), out_dir=out / "tok",
                          progress=False)
    torch.manual_seed(0)
    return save_model(MiniMindForCausalLM(cfg), out / "model", tok)


def contenders(d: Path, only: list[str], batch: int, n_ctx: int, threads: int) -> dict:
    def fused(**kw):
        return load_model(d, **kw).fuse_projections()  # as load_for_inference does

    makers = {
        "ours fp32": lambda: Ours(fused(), False),
        "ours bf16": lambda: Ours(fused(dtype=torch.bfloat16), False),
        "ours bf16 compiled": lambda: Ours(fused(dtype=torch.bfloat16), True),
        "ours int8": lambda: Ours(quantize_int8(fused()), False),
        "ours int8 compiled": lambda: Ours(quantize_int8(fused()), True),
        "hf fp32": lambda: HF(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()),
        "hf bf16": lambda: HF(AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()),
    }
    if importlib.util.find_spec("llama_cpp") is not None:
        from minimind.export.gguf import export_gguf

        for qtype in ("f32", "q8_0"):
            path = d.parent / f"model-{qtype}.gguf"
            if not path.exists():
                export_gguf(d, path, qtype)
            makers[f"llama.cpp {qtype}"] = lambda p=path: LlamaCpp(p, batch, n_ctx, threads)
    return {k: make() for k, make in makers.items() if not only or any(o in k for o in only)}


def ratio(speed: dict, a: str, b: str) -> str:
    return f"{a} / {b} {speed[a] / speed[b]:.2f}x" if a in speed and b in speed else ""


def bench_preset(name: str, batches: list[int], prompt_len: int, new_tokens: int, repeats: int,
                 only: list[str]) -> None:
    cfg = ModelConfig.preset(name)
    default = f"ours {'bf16' if pick_dtype('auto', torch.device('cpu')) == torch.bfloat16 else 'fp32'}"
    print(f"\n{name} ({cfg.num_parameters() / 1e6:.1f}M parameters), prompt {prompt_len}, {new_tokens} new tokens, "
          f"median of {repeats}; our default dtype here is {default.split()[1]}", flush=True)
    g = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        d = random_model_dir(cfg, Path(tmp))
        for batch in batches:
            models = contenders(d, only, batch, prompt_len + new_tokens + 8, torch.get_num_threads())
            prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
            for key, m in models.items():  # warm-up: compiles (logged with their time), first-touch allocations
                if "compiled" in key:
                    took = timed(lambda m=m, p=prompts: m.decode(p, 4))
                    print(f"  {key}: compile + first run {took:.1f} s", flush=True)
            runs: dict[str, list[float]] = {k: [] for k in models}
            for _ in range(repeats):  # interleaved, so machine noise hits every contender alike
                for key, m in models.items():
                    runs[key].append(timed(lambda m=m, p=prompts: m.decode(p, new_tokens)))
            speed = {k: batch * new_tokens / statistics.median(v) for k, v in runs.items()}
            print(f"  decode batch {batch}: " + " | ".join(f"{k} {v:6.1f}" for k, v in speed.items()) + " tok/s")
            pairs = [("ours bf16 compiled", "ours bf16"), ("ours int8 compiled", "ours int8"),
                     ("ours bf16", "hf bf16"), ("ours fp32", "hf fp32"),
                     ("ours int8 compiled", "llama.cpp q8_0"), ("ours int8", "llama.cpp q8_0"),
                     ("ours bf16 compiled", "llama.cpp f32")]
            print("    ratios: " + "; ".join(r for r in (ratio(speed, a, b) for a, b in pairs) if r), flush=True)
        ids = torch.randint(3, cfg.vocab_size, (1, 512), generator=g)
        models = contenders(d, only, 1, 520, torch.get_num_threads())
        pre: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(repeats):
            for key, m in models.items():
                pre[key].append(timed(lambda m=m: m.prefill(ids)))
        speed = {k: 512 / statistics.median(v) for k, v in pre.items() if "compiled" not in k}  # eager prefill
        print("  prefill 512: " + " | ".join(f"{k} {v:6.0f}" for k, v in speed.items()) + " tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["minimind2-small", "minimind-3"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=[],
                        help="contenders whose name contains one of these words (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.presets:
        bench_preset(name, args.batches, args.prompt_len, args.new_tokens, args.repeats, args.only)


if __name__ == "__main__":
    main()
