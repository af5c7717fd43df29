"""Text generation: THE sampler (temperature, top-k, top-p, min-p, repetition penalty, seed), KV-cache
decoding of a batch of left-padded prompts, stop tokens and stop strings, and streaming text.

`generate(model, tokenizer, [ids], SamplingParams(max_new_tokens=64))` -> list of Completion;
`for piece in stream(model, tokenizer, ids, params): print(piece, end="")`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from minimind import MiniMindError
from minimind.model import KVCache, MiniMindForCausalLM

# What a model directory's generation_config.json says when we write it (checkpoint.save_model): MiniMind's own
# chat defaults. Every front end (CLI, API, web page, Ollama export) starts from the model's file, as
# transformers and vLLM do, and flags or request fields override it.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.85, "top_p": 0.85, "top_k": 50, "max_new_tokens": 512}


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.85  # 0 means greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off; keep tokens with prob >= min_p * the top token's prob
    repetition_penalty: float = 1.0  # CTRL-style, over prompt and output; 1: off
    stop: Sequence[str] = ()  # stop strings; the text is cut before them
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.temperature < 0 or self.top_k < 0:
            raise ValueError("max_new_tokens, temperature and top_k must be >= 0")
        if not 0 < self.top_p <= 1 or not 0 <= self.min_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("top_p must be in (0, 1], min_p in [0, 1], repetition_penalty > 0")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)


def sampling_defaults(model_dir: str | Path) -> dict:
    """The SamplingParams fields that the model directory's generation_config.json sets (transformers' names;
    `do_sample: false` means greedy). A directory without the file gives {} (SamplingParams' own defaults)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        gen = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MiniMindError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(gen, dict):
        raise MiniMindError(f"{path}: expected a JSON object")
    names = {f.name for f in fields(SamplingParams)} - {"stop", "seed"}
    out = {}
    for key in sorted(names & gen.keys()):
        value = gen[key]
        kind = int if key in ("top_k", "max_new_tokens") else float
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MiniMindError(f"{path}: field {key!r} must be a number, not {value!r}")
        out[key] = kind(value)
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    try:
        SamplingParams(**out)
    except ValueError as e:
        raise MiniMindError(f"{path}: {e}") from None
    return out


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos or a stop string) or "length"
    prompt_tokens: int = 0


class Sampler:
    """Picks the next token for each row, each row with its own settings (a batch may mix requests)."""

    def __init__(self, params: list[SamplingParams], vocab_size: int, device: torch.device) -> None:
        col = lambda name, dtype=torch.float32: torch.tensor(  # noqa: E731
            [getattr(p, name) for p in params], dtype=dtype, device=device)[:, None]
        self.temperature, self.top_p, self.min_p = col("temperature"), col("top_p"), col("min_p")
        self.penalty = col("repetition_penalty")
        # top_k beyond the vocabulary means "off"; clamped here, so no k can overflow a long tensor
        self.top_k = torch.tensor([min(p.top_k, vocab_size) for p in params], device=device)[:, None]
        self.seen = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)
        self.generators = []
        for p in params:
            g = torch.Generator(device=device)
            g.manual_seed(p.seed if p.seed is not None else int(torch.randint(2**62, ()).item()))
            self.generators.append(g)
        self._summarize()

    _ROW_TENSORS = ("temperature", "top_p", "min_p", "top_k", "penalty", "seen")

    def _summarize(self) -> None:
        self.greedy = self.temperature.squeeze(1) == 0
        self.all_greedy = bool(self.greedy.all())
        self.any_top_k = bool((self.top_k > 0).any())
        self.any_top_p = bool((self.top_p < 1).any())
        self.any_min_p = bool((self.min_p > 0).any())
        self.any_penalty = bool((self.penalty != 1).any())

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (a row may repeat): finished requests leave a running batch."""
        index = torch.tensor(rows, dtype=torch.long, device=self.seen.device)
        for name in self._ROW_TENSORS:
            setattr(self, name, getattr(self, name)[index])
        self.generators = [self.generators[i] for i in rows]
        self._summarize()

    def extend(self, other: Sampler) -> None:
        """Append the rows of another sampler (new requests join a running batch with their own settings).
        All or nothing: if a concatenation fails (out of memory), this sampler is left as it was."""
        joined = {name: torch.cat([getattr(self, name), getattr(other, name)]) for name in self._ROW_TENSORS}
        for name, value in joined.items():
            setattr(self, name, value)
        self.generators += other.generators
        self._summarize()

    def observe(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Record tokens [B, T] for the repetition penalty (mask marks real tokens, not padding)."""
        if not self.any_penalty:
            return
        counts = torch.zeros(self.seen.shape, dtype=torch.long, device=ids.device)
        counts.scatter_add_(1, ids, torch.ones_like(ids) if mask is None else mask.long())
        self.seen |= counts > 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        tokens, ok = self.sample(logits)
        if not bool(ok.all()):
            raise ValueError(f"the next-token scores of row {int((~ok).nonzero()[0])} are NaN or infinite: the "
                             f"model's weights or the sampling settings are broken")
        return tokens

    def sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token of each row [B] and whether the row's scores made a distribution [B] (bool). A row
        with NaN or infinite scores (broken weights, a penalty that rounds to 0) gets False and an arbitrary
        token, and cannot disturb the other rows: the server fails that request alone."""
        logits = logits.float()
        if self.any_penalty:
            penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        # -inf alone is a legal score (never pick it); NaN, +inf or nothing finite is no distribution. A row's
        # largest score is NaN if any is, +inf if any is and -inf if all are: finite exactly when the row is fine.
        ok = logits.amax(-1).isfinite()
        best = logits.argmax(-1)
        if self.all_greedy:
            return best, ok
        logits = torch.where(ok[:, None], logits, 0.0)  # uniform: multinomial never sees NaN (a device assert)
        logits = logits / self.temperature.clamp(min=1e-6)
        if self.any_top_k:
            k = torch.where(self.top_k > 0, self.top_k, logits.shape[-1]).clamp(max=logits.shape[-1])
            kth = logits.sort(-1, descending=True).values.gather(-1, k - 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if self.any_top_p:
            sorted_p, order = probs.sort(-1, descending=True)
            # Drop a token when the tokens before it already reach top_p; the top token always stays.
            drop = (sorted_p.cumsum(-1) - sorted_p) >= self.top_p
            probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
        if self.any_min_p:
            probs = probs.masked_fill(probs < self.min_p * probs.max(-1, keepdim=True).values, 0.0)
        picked = torch.stack([torch.multinomial(probs[i], 1, generator=g)[0]
                              for i, g in enumerate(self.generators)])
        return torch.where(self.greedy, best, picked), ok


class Detokenizer:
    """Turns a growing list of ids into text pieces, never emitting half of a multi-byte character and
    holding back text that may be the start of a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0  # decode from `prefix` so merges across pieces come out right
        self.text = ""  # all text decoded so far
        self.sent = 0  # how much of `text` has been handed out
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s) + 1))
            if at != -1 and at < end:
                end, self.stopped = at, True
        if not self.stopped and not final:
            # Keep back the longest tail that could still grow into a stop string.
            for s in self.stop:
                for n in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if s.startswith(self.text[end - n:end]):
                        end -= n
                        break
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        if self.stopped:
            self.text = self.text[:self.sent]
        return piece

    def flush(self) -> str:
        return "" if self.stopped else self._release(final=True)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, width - len(p):] = 1
    return ids, mask


log = logging.getLogger("minimind.generation")
# One compiled wrapper for every model: Dynamo keys its cache on the code object and guards on the model and
# the shapes, so each (model, batch, cache length) compiles once per process; Inductor's on-disk cache
# (TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER) makes later processes' compiles much cheaper.
_compiled_step = None
_compiled_shapes: set = set()


def cache_length(needed: int, limit: int, compile: bool) -> int:
    """Positions to preallocate. A compiled step is specialised to its shapes, so round up to a power of two
    (at least 128, at most the context): a new prompt length then rarely means a new compile."""
    if not compile:
        return needed
    return min(limit, max(128, 1 << (needed - 1).bit_length()))


def fixed_step(model: MiniMindForCausalLM, cache: KVCache, tokens: torch.Tensor, compile: bool) -> torch.Tensor:
    """Logits [B, V] after feeding tokens [B] (one per cache row) at the cache's next position: model.decode_step
    over the whole preallocated cache, compiled by torch.compile (Inductor, static shapes) when `compile`.
    The first step of a new shape logs its compile time."""
    global _compiled_step
    step = None
    if compile:
        if _compiled_step is None:
            torch._dynamo.config.recompile_limit = 64  # one entry per (model, batch, cache length)
            _compiled_step = torch.compile(MiniMindForCausalLM.step_logits, dynamic=False)
        step = _compiled_step
    key = (id(model), tuple(cache.k.shape), cache.k.dtype)
    if compile and key not in _compiled_shapes:
        log.info("compiling the decode step for batch %d x %d cached positions (about a minute on a small CPU the "
                 "first time, seconds once Inductor's disk cache has it)", cache.k.shape[1], cache.k.shape[3])
    start = time.perf_counter()
    logits = model.decode_step(tokens, cache.k, cache.v, cache.valid,
                               torch.tensor([cache.length], device=cache.k.device), cache.next_pos, step)
    cache.length += 1
    if compile and key not in _compiled_shapes:
        _compiled_shapes.add(key)
        log.info("compiled the decode step for batch %d x %d cached positions in %.1f s (once per shape and "
                 "process; --no-compile turns it off)", cache.k.shape[1], cache.k.shape[3],
                 time.perf_counter() - start)
    return logits


@torch.inference_mode()
def decode(model: MiniMindForCausalLM, prompts: list[list[int]], params: list[SamplingParams],
           use_cache: bool = True, compile: bool | None = None, images: dict | None = None
           ) -> Iterator[torch.Tensor]:
    """The decoding loop: yields one new token per row per step ([B] tensor), finished rows included
    (the caller decides when a row is done and stops iterating when all are). Steps after the prefill run
    model.decode_step over a preallocated cache, compiled if `compile` (None: the model's `compile_decode`,
    which load_for_inference sets). With use_cache=False every step recomputes the whole sequence, which
    tests use as the reference. `images` goes to every forward over the whole prompt (a VisionLanguageModel's
    pixel_values and image_counts); cached steps need no images."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.model.embed_tokens.weight.device
    cfg = model.config
    ids, mask = left_pad(prompts, cfg.pad_token_id, device)
    steps = max(p.max_new_tokens for p in params)
    limit = cfg.max_position_embeddings
    if ids.shape[1] + steps > limit:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({steps}) exceeds the model's "
                         f"context of {limit} tokens")
    sampler = Sampler(params, cfg.vocab_size, device)
    sampler.observe(ids, mask)
    compile = getattr(model, "compile_decode", False) if compile is None else compile
    images = images or {}
    cache = None
    if use_cache:
        cache = model.new_cache(len(prompts), cache_length(ids.shape[1] + steps, limit, compile))
    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1, **images).logits[:, -1]
    for _ in range(steps):
        token = sampler(logits)
        yield token
        sampler.observe(token[:, None])
        if cache is not None:
            logits = fixed_step(model, cache, token, compile)
        else:
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(token[:, None])], 1)
            logits = model(ids, attention_mask=mask, logits_to_keep=1, **images).logits[:, -1]


def stop_token_ids(model: MiniMindForCausalLM, tokenizer) -> set[int]:
    ids = {model.config.eos_token_id}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class RowState:
    """One row's progress through decoding: stop tokens, stop strings, the length limit, its text and token
    ids (in its Completion). Batched generation and the server's scheduler both feed rows through it."""

    def __init__(self, tokenizer, params: SamplingParams, result: Completion, stops: set[int]) -> None:
        self.params, self.result, self.stops = params, result, stops
        self.detok = Detokenizer(tokenizer, params.stop) if tokenizer is not None else None
        self.steps = 0
        self.active = params.max_new_tokens > 0
        result.finish_reason = None if self.active else "length"

    def feed(self, token: int) -> list[str]:
        """Take the row's next token; return the text pieces it releases. When the row is done, `active`
        turns False and result.finish_reason says why ("stop" or "length")."""
        r, pieces = self.result, []
        self.steps += 1
        if token in self.stops:
            r.finish_reason, self.active = "stop", False
        else:
            r.token_ids.append(token)
            if self.detok is not None:
                piece = self.detok.add(token)
                if piece:
                    pieces.append(piece)
                if self.detok.stopped:
                    r.finish_reason, self.active = "stop", False
        if self.active and self.steps >= self.params.max_new_tokens:
            r.finish_reason, self.active = "length", False
        if not self.active and self.detok is not None:
            pieces.append(self.detok.flush())
        pieces = [p for p in pieces if p]
        r.text += "".join(pieces)
        return pieces


def generate_iter(model: MiniMindForCausalLM, tokenizer, prompts: list[list[int]],
                  params: SamplingParams | list[SamplingParams], results: list[Completion],
                  use_cache: bool = True, compile: bool | None = None,
                  images: dict | None = None) -> Iterator[tuple[int, str]]:
    """Batched generation as a stream of (row, text piece) events; `results` (one Completion per prompt)
    is filled in as it goes: token ids, text and finish_reason. `compile`, `images`: see decode()."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    if len(params) != len(prompts) or len(results) != len(prompts):
        raise ValueError("give one SamplingParams (or one for all) and one Completion per prompt")
    stops = stop_token_ids(model, tokenizer)
    rows = [RowState(tokenizer, p, r, stops) for p, r in zip(params, results)]
    for r, p in zip(results, prompts):
        r.prompt_tokens = len(p)
    if not any(row.active for row in rows):
        return
    for tokens in decode(model, prompts, params, use_cache, compile, images):
        for i, t in enumerate(tokens.tolist()):
            if rows[i].active:
                for piece in rows[i].feed(t):
                    yield i, piece
        if not any(row.active for row in rows):
            return


def generate(model: MiniMindForCausalLM, tokenizer, prompts: list[list[int]],
             params: SamplingParams | list[SamplingParams] | None = None, use_cache: bool = True,
             compile: bool | None = None, images: dict | None = None) -> list[Completion]:
    """Generate for a batch of prompts (lists of token ids); returns one Completion per prompt. A vision model
    takes images={"pixel_values": [N, 3, S, S], "image_counts": [B]} for the prompts' image pads."""
    results = [Completion() for _ in prompts]
    for _ in generate_iter(model, tokenizer, prompts, params or SamplingParams(), results, use_cache, compile,
                           images):
        pass
    return results


def stream(model: MiniMindForCausalLM, tokenizer, prompt: list[int], params: SamplingParams,
           result: Completion | None = None, images: dict | None = None) -> Iterator[str]:
    """Stream text pieces for one prompt; pass `result` to receive token ids and finish_reason."""
    for _, piece in generate_iter(model, tokenizer, [prompt], params, [result or Completion()], images=images):
        yield piece
