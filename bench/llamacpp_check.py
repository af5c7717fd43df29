"""llama.cpp round trip: export a model to GGUF (f32, f16, q8_0), load it with llama-cpp-python, and compare its
tokenization and greedy generation with ours token for token. `python bench/llamacpp_check.py [--model DIR]`.

Needs `CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36` (about 8 minutes to build), hence
outside the test suite (`make check-llamacpp`). Besides --model it checks small random models of every family
(qwen3, qwen3moe, llama with tied and untied output, qwen3 with YaRN), so each architecture's layout is exercised.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minimind.chat import render
from minimind.checkpoint import load_model, save_model
from minimind.config import ModelConfig
from minimind.export.gguf import GGUF_TYPES, export_gguf
from minimind.generation import SamplingParams, generate
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import load_tokenizer

DEMO_MODEL = Path("runs/demo/sft/model")
TOOL = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic",
                                         "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}}}}
TEXTS = [
    "The quick brown fox jumps over the lazy dog. To be, or not to be: that is the question.",
    "今天天气很好，我们一起去公园散步吧。新华社北京电，国务院今天举行新闻发布会。",
    "Numbers 3 33 333 3333 12.5% and    spaces\n\n\ttabs, emoji 🦙🚀, I've 'RE we'll",
    "<think>\nlet me add 3 and 4\n</think>\n\n<tool_call>\n{\"name\": \"calculator\"}\n</tool_call><|im_end|>",
    render([{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "12 * 3 = ?"},
            {"role": "assistant", "content": "36", "reasoning_content": "12 * 3 is 36"},
            {"role": "tool", "content": "36"}, {"role": "user", "content": "你好"}],
           tools=[TOOL], add_generation_prompt=True),
]
CHATS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "请介绍一下你自己。"}],
    [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Write about the sea."}],
]
RAW = ["To be, or not to be", "北京是中国的首都，"]


@dataclass
class Row:
    model: str
    qtype: str
    check: str
    matched: int
    total: int
    status: str
    note: str = ""


def random_family_models(tokenizer, root: Path) -> dict[str, Path]:
    """Small random models of every family sharing `tokenizer`, with weights large enough for clear argmaxes."""
    base = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                intermediate_size=256, vocab_size=len(tokenizer), max_position_embeddings=1024,
                initializer_range=0.08)
    variants = {
        "rand-qwen3": dict(base),
        "rand-qwen3moe": dict(base, use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128),
        "rand-llama": dict(base, qk_norm=False, rms_norm_eps=1e-5),
        "rand-llama-untied": dict(base, qk_norm=False, tie_word_embeddings=False),
        "rand-qwen3-yarn": dict(base, rope_scaling="yarn", yarn_factor=4.0,
                                yarn_original_max_position_embeddings=256),
    }
    out = {}
    for i, (name, kw) in enumerate(variants.items()):
        torch.manual_seed(i)
        model = MiniMindForCausalLM(ModelConfig(**kw))
        with torch.no_grad():  # random norm weights, so a misplaced norm cannot hide behind ones
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        out[name] = save_model(model.eval(), root / name, tokenizer)
    return out


def tiny_model(root: Path) -> Path:
    """No model given and no demo run: a randomly initialised `tiny` model with a tokenizer trained on a slice of
    the built-in data (random weights still make a valid token-for-token comparison)."""
    from minimind.data.builtin import write_builtin
    from minimind.tokenizer import train_tokenizer

    data = write_builtin(root / "data", pretrain_chars=400_000, pretrain_val_chars=10_000, sft_tasks=200,
                         val_tasks=10, heldout_tasks=10, rl_tasks=10, dpo_pairs=10)
    tokenizer = train_tokenizer([data["pretrain"], data["sft"]], 3000, out_dir=root / "tokenizer", progress=False)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.preset("tiny", vocab_size=len(tokenizer)))
    return save_model(model.eval(), root / "tiny-random", tokenizer)


def load_llama(path: Path, n_ctx: int, threads: int):
    """llama_cpp.Llama with weight repacking off: ggml's AMX repack path dies with SIGILL on quantised weights on
    these CPUs. Llama() has no argument for it (extra keywords are silently ignored), so set it in the model
    parameters it starts from."""
    import llama_cpp

    lib = llama_cpp.llama_cpp
    default = lib.llama_model_default_params

    def no_repack():
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = no_repack
    try:
        # logits_all: keep every position's logits in .scores, which the greedy loop reads
        # f32 KV cache (llama.cpp's default is f16), so an f32 file is compared at f32 all the way through
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, logits_all=True,
                               type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    finally:
        lib.llama_model_default_params = default


def llama_greedy(llm, prompt: list[int], n: int, stops: set[int]) -> tuple[list[int], np.ndarray]:
    """Greedy decoding by hand (argmax of llama.cpp's logits), stopping on our stop tokens like generate()."""
    llm.reset()
    llm.eval(prompt)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    out = []
    logits = first
    for _ in range(n):
        tok = int(np.argmax(logits))
        if tok in stops:
            break
        out.append(tok)
        llm.eval([tok])
        logits = np.array(llm.scores[llm.n_tokens - 1])
    return out, first


def check_model(name: str, directory: Path, types: list[str], n_tokens: int, threads: int, tmp: Path) -> list[Row]:
    from minimind.chat import encode_chat

    tokenizer = load_tokenizer(directory)
    model = load_model(directory, dtype=torch.float32)
    stops = {model.config.eos_token_id, tokenizer.eos_token_id}
    prompts = [encode_chat(tokenizer, c, add_generation_prompt=True)[0] for c in CHATS]
    prompts += [tokenizer.encode(t, add_special_tokens=False) for t in RAW]
    params = SamplingParams(max_new_tokens=n_tokens, temperature=0.0)
    ours = [generate(model, tokenizer, [p], params)[0].token_ids for p in prompts]  # one at a time, no padding
    with torch.no_grad():
        our_first = [model(torch.tensor([p])).logits[0, -1].double().numpy() for p in prompts]
    rows = []
    for qtype in types:
        path = export_gguf(directory, tmp / f"{name}-{qtype}.gguf", qtype)
        llm = load_llama(path, min(1024, model.config.max_position_embeddings), threads)
        if qtype == types[0]:
            same = sum(llm.tokenize(t.encode(), add_bos=False, special=True)
                       == tokenizer.encode(t, add_special_tokens=False) for t in TEXTS)
            rows.append(Row(name, "-", "tokenize", same, len(TEXTS), "PASS" if same == len(TEXTS) else "FAIL"))
        matched = total = 0
        worst = 0.0
        notes = []
        for k, (prompt, want) in enumerate(zip(prompts, ours)):
            got, first = llama_greedy(llm, prompt, n_tokens, stops)
            scale = np.abs(our_first[k]).max()
            worst = max(worst, float(np.abs(first - our_first[k]).max() / scale))
            prefix = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            matched += prefix if (got != want) else len(want)
            total += max(len(got), len(want))
            if got != want:
                # how close our own top two were there: flips between near-ties are rounding, not layout errors
                with torch.no_grad():
                    logits = model(torch.tensor([prompt + want[:prefix]])).logits[0, -1]
                top = logits.topk(2).values
                gap = float((top[0] - top[1]) / logits.abs().max())
                notes.append(f"prompt {k} diverges at token {prefix} (our top-2 gap there {gap:.1%})")
        exact = matched == total
        # f32 must agree exactly; f16/q8_0 round weights, so an argmax between two near-equal logits may flip
        status = "PASS" if exact else ("FAIL" if qtype == "f32" else "DIFF")
        note = f"first-step logits max rel diff {worst:.1e}" + ("; " + "; ".join(notes) if notes else "")
        rows.append(Row(name, qtype, "greedy", matched, total, status, note))
        del llm
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help=f"model directory (default: {DEMO_MODEL} if it exists, else a "
                    "random `tiny` model)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--types", nargs="+", default=list(GGUF_TYPES), choices=GGUF_TYPES, help="GGUF weight types")
    ap.add_argument("--no-families", action="store_true", help="skip the random models of each family")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit('llama-cpp-python is missing: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36')
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else (DEMO_MODEL if DEMO_MODEL.is_dir() else None)
    start = time.time()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if model_dir is None:
            model_dir = tiny_model(tmp)
        models = {model_dir.name if model_dir.name != "model" else str(model_dir): model_dir}
        if not args.no_families:
            models.update(random_family_models(load_tokenizer(model_dir), tmp / "models"))
        for name, directory in models.items():
            rows += check_model(name, Path(directory), args.types, args.tokens, args.threads, tmp)
            print(f"  checked {name} ({time.time() - start:.0f} s)", file=sys.stderr)
    print(f"llama-cpp-python {llama_cpp.__version__}, {args.tokens} greedy tokens per prompt, "
          f"{len(CHATS) + len(RAW)} prompts, {len(TEXTS)} tokenization samples\n")
    print(f"| {'model':<28} | {'type':<4} | {'check':<8} | {'matched':>9} | status | note")
    print(f"|{'-' * 30}|------|{'-' * 10}|{'-' * 11}|--------|------")
    for r in rows:
        print(f"| {r.model:<28} | {r.qtype:<4} | {r.check:<8} | {f'{r.matched}/{r.total}':>9} | {r.status:<6} | "
              f"{r.note}")
    failed = [r for r in rows if r.status == "FAIL"]
    print(f"\n{'FAIL' if failed else 'PASS'}: {len(rows) - len(failed)}/{len(rows)} checks passed "
          f"({time.time() - start:.0f} s)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
