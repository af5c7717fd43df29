"""The continuous-batching scheduler: one background thread owns the model and decodes every running request
together; a new request joins at the next step, a finished or cancelled one leaves. Used by minimind.serve.api.

    sched = Scheduler(model, tokenizer, max_batch=16); sched.start()
    job = sched.submit(prompt_ids, [SamplingParams(...)], emit=print)   # events arrive on the thread
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minimind.generation import (
    Completion,
    RowState,
    Sampler,
    SamplingParams,
    cache_length,
    fixed_step,
    left_pad,
    stop_token_ids,
)
from minimind.model import KVCache, MiniMindForCausalLM

log = logging.getLogger("minimind.serve")


NOT_A_DISTRIBUTION = ("generation failed: the next-token scores are NaN or infinite (the model's weights or this "
                      "request's sampling settings are broken)")


class QueueFull(Exception):
    """The waiting queue is at its limit: the server answers 429."""


@dataclass
class Event:
    """What the scheduler thread reports about one choice of a job: kind is "piece" (text), "done"
    (result is final) or "error" (message in text; sent to every choice of the job)."""

    kind: str
    index: int
    text: str = ""
    result: Completion | None = None


@dataclass
class Job:
    """One request: `n` rows (choices) sharing a prompt, each with its own sampling settings."""

    prompt: list[int]
    params: list[SamplingParams]
    emit: Callable[[Event], None]  # called on the scheduler thread; must be quick and must not raise
    results: list[Completion] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past the end token (benchmarks, vLLM's `ignore_eos`)
    images: torch.Tensor | None = None  # a vision model's pixel values [N, 3, S, S] for the prompt's image pads
    cancelled: bool = False
    error: str | None = None  # why it failed (its "error" event went out); the other jobs go on
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # perf_counter time of the first sampled token

    @property
    def done(self) -> bool:
        return bool(self.results) and all(r.finish_reason is not None for r in self.results)


@dataclass
class _Row:
    job: Job
    index: int
    state: RowState


class Scheduler:
    """Continuous batching over one model: at every step each running row gets one token.

    Rows share one KV cache (KVCache.join/keep/reserve); the requests that join at a step are prefilled
    together (left-padded) and then decode with the batch, padding masked, each row as if it were alone. Sampling
    settings travel per row in THE Sampler (Sampler.extend/keep). With `compile` (None: the model's
    compile_decode) each step runs generation's compiled fixed-shape step: the cache is padded to a power-of-two
    number of rows (batch slots) and positions, so a handful of shapes serve every mix of requests; start()
    compiles every slot count at the first cache length before it returns (see _warm_up)."""

    def __init__(self, model: MiniMindForCausalLM, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 compile: bool | None = None) -> None:
        if max_batch < 1 or max_queue < 1:  # a queue of 0 would refuse every request
            raise ValueError("max_batch and max_queue must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.compile = getattr(model, "compile_decode", False) if compile is None else compile
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_slots = 1 << (max_batch - 1).bit_length()  # the compiled step's batch slots: a power of two
        self.device = model.model.embed_tokens.weight.device
        self.stops = stop_token_ids(model, tokenizer)
        self.waiting: collections.deque[Job] = collections.deque()
        self.rows: list[_Row] = []
        self.cache: KVCache | None = None
        self.sampler: Sampler | None = None
        self.logits: torch.Tensor | None = None  # [rows, vocab]: each row's next-token logits
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0  # decode steps run (for /health and tests)
        self.peak_batch = 0  # the most rows decoded together so far

    # ---- called from other threads --------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread; with `compile`, return once its decode steps are compiled."""
        if self.thread is None:
            warm = threading.Event()
            self.thread = threading.Thread(target=self._loop, args=(warm,), name="minimind-scheduler", daemon=True)
            self.thread.start()
            warm.wait()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)
            self.thread = None

    def submit(self, prompt: list[int], params: list[SamplingParams], emit: Callable[[Event], None],
               ignore_eos: bool = False, images: torch.Tensor | None = None) -> Job:
        """Queue a request (`images`: a vision model's pixel values for the prompt's images, in order); raises
        QueueFull when `max_queue` requests already wait, ValueError when it can never fit (more choices than
        max_batch, empty prompt)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if not 1 <= len(params) <= self.max_batch:
            raise ValueError(f"n must be between 1 and {self.max_batch} (the server's --max-batch)")
        job = Job(list(prompt), list(params), emit, ignore_eos=ignore_eos,
                  images=images if images is not None and len(images) else None)
        job.results = [Completion(prompt_tokens=len(prompt)) for _ in params]
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"server busy: {len(self.waiting)} requests are waiting (the limit, --max-queue) "
                                f"and {len(self.rows)} rows are decoding; retry later")
            self.waiting.append(job)
            self.cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away): it leaves the batch before the next step, or the queue at once
        (so it neither holds a place in --max-queue nor blocks the head of the queue)."""
        with self.cond:
            job.cancelled = True
            self.waiting = collections.deque(j for j in self.waiting if j is not job)
            self.cond.notify_all()

    def stats(self) -> dict:
        with self.cond:
            return {"running": len({id(r.job) for r in self.rows}), "running_rows": len(self.rows),
                    "waiting": len(self.waiting), "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "steps": self.steps, "peak_batch": self.peak_batch}

    # ---- the scheduler thread -------------------------------------------------------------------------

    def _loop(self, warm: threading.Event) -> None:
        with torch.inference_mode():
            try:
                if self.compile:
                    self._warm_up()
            except Exception:  # the first requests compile what is missing
                log.exception("compiling the decode steps at start failed")
            finally:
                warm.set()
            while True:
                with self.cond:
                    while not self.stopping and not self.rows and not self.waiting:
                        self.cond.wait()
                    if self.stopping:
                        return
                    gone = [i for i, r in enumerate(self.rows) if r.job.cancelled]
                    admitted, free = [], self.max_batch - len(self.rows) + len(gone)
                    while self.waiting and len(self.waiting[0].params) <= free:  # cancelled jobs are not here
                        job = self.waiting.popleft()
                        admitted.append(job)
                        free -= len(job.params)
                try:
                    if gone:
                        self._drop(gone)
                    if admitted:
                        self._admit(admitted)
                    if self.rows:
                        self._step()
                except Exception as e:  # a bug, or out of memory in the batch's shared state: keep serving
                    log.exception("decoding step failed")
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}", admitted)

    def _warm_up(self) -> None:
        """Compile the decode step for every batch-slot count at the first cache length, on this thread (the
        model's) before any request: a shape first met while serving stalled every running stream for the
        seconds its compile took. Longer caches (long prompts) still compile when first met."""
        length = cache_length(1, self.model.config.max_position_embeddings, True)
        for slots in (1 << i for i in range(self.max_slots.bit_length())):
            tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
            fixed_step(self.model, self.model.new_cache(slots, length), tokens, True)

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the new jobs together and join the running batch. If the prefill raises (out of memory, a
        request's settings), each job is tried alone: the one at fault fails alone, the others join."""
        try:
            prefilled = self._prefill(jobs)
        except Exception as e:
            if len(jobs) > 1:
                log.warning("prefill of %d requests failed (%s); trying each alone", len(jobs), e)
                for job in jobs:
                    self._admit([job])
                return
            log.exception("prefill failed")
            self._fail(jobs, f"generation failed: {type(e).__name__}: {e}")
            return
        self._join(*prefilled)
        for job in jobs:
            job.images = None  # in the KV cache now

    def _prefill(self, jobs: list[Job]) -> tuple[KVCache, torch.Tensor, Sampler, list[_Row]]:
        """The new prompts prefilled together (left-padded, once for all n choices of a job), with their
        sampler and rows; the running batch is not touched. Padding is masked, so each prompt's logits are
        those it would get alone. The jobs' images go in together, in job order (text-only jobs count 0)."""
        ids, mask = left_pad([j.prompt for j in jobs], self.model.config.pad_token_id, self.device)
        cache = self.model.new_cache(len(jobs), ids.shape[1])
        images = {}
        if any(j.images is not None for j in jobs):
            images = {"pixel_values": torch.cat([j.images for j in jobs if j.images is not None]).to(self.device),
                      "image_counts": [0 if j.images is None else len(j.images) for j in jobs]}
        logits = self.model(ids, attention_mask=mask, cache=cache, logits_to_keep=1, **images).logits[:, -1]
        index = [k for k, job in enumerate(jobs) for _ in job.params]  # row k of the prefill, once per choice
        if index != list(range(len(jobs))):
            cache.keep(index)
            logits, ids, mask = logits[index], ids[index], mask[index]
        sampler = Sampler([p for job in jobs for p in job.params], self.model.config.vocab_size, self.device)
        sampler.observe(ids, mask)
        rows = []
        for job in jobs:
            stops = set() if job.ignore_eos else self.stops
            rows += [_Row(job, i, RowState(self.tokenizer, p, job.results[i], stops))
                     for i, p in enumerate(job.params)]
        return cache, logits, sampler, rows

    def _join(self, cache: KVCache, logits: torch.Tensor, sampler: Sampler, rows: list[_Row]) -> None:
        """Add prefilled rows to the running batch (the fallible allocations first, while nothing changed)."""
        if self.rows:
            logits = torch.cat([self.logits, logits.to(self.logits.dtype)])
            self.cache.join(cache, extra=1)
            self.sampler.extend(sampler)
            self.logits = logits
        else:
            self.cache, self.sampler, self.logits = cache, sampler, logits
        with self.cond:
            self.rows = self.rows + rows
        self.peak_batch = max(self.peak_batch, len(self.rows))
        for row in rows:  # max_tokens=0: done before its first token
            if not row.state.active:
                row.job.emit(Event("done", row.index, result=row.state.result))
        self._drop([i for i, r in enumerate(self.rows) if not r.state.active])

    def _step(self) -> None:
        """Sample one token for every row, hand out the text, drop finished rows, run the model once. A row
        whose sampling fails fails its job (all its choices) alone."""
        tokens, failures = self._sample()
        self.sampler.observe(tokens[:, None])
        now = time.perf_counter()
        failed = {id(self.rows[i].job): (self.rows[i].job, message) for i, message in failures.items()}
        finished = []
        for i, (row, t) in enumerate(zip(self.rows, tokens.tolist())):
            job = row.job
            if id(job) in failed:
                finished.append(i)
                continue
            if job.first_token is None:
                job.first_token = now
            for piece in row.state.feed(t):
                job.emit(Event("piece", row.index, piece))
            if not row.state.active:
                job.emit(Event("done", row.index, result=row.state.result))
                finished.append(i)
        self.steps += 1
        if finished:
            tokens = tokens[[i for i in range(len(self.rows)) if i not in set(finished)]]
            self._drop(finished)
        for job, message in failed.values():
            self._fail([job], message)  # its rows left with `finished`
        if self.rows:
            self.cache.reserve(1)
            self.logits = self._forward(tokens)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits [rows, V] after one token per row."""
        if not self.compile:
            return self.model(tokens[:, None], cache=self.cache, logits_to_keep=1).logits[:, -1]
        n, limit = len(tokens), self.model.config.max_position_embeddings
        slots = min(1 << (n - 1).bit_length(), self.max_slots)
        self.cache.pad_to(slots, cache_length(self.cache.max_len, limit, True))
        tokens = torch.cat([tokens, tokens.new_zeros(slots - n)])
        return fixed_step(self.model, self.cache, tokens, True)[:n]

    def _sample(self) -> tuple[torch.Tensor, dict[int, str]]:
        """The next token of every row and {row: why} for the rows whose sampling failed. If the batch's
        sampling raises, each row is sampled alone, so one row's fault cannot take the others down."""
        try:
            tokens, ok = self.sampler.sample(self.logits)
        except Exception:
            log.exception("sampling the batch failed; sampling each row alone")
        else:
            return tokens, {i: NOT_A_DISTRIBUTION for i, good in enumerate(ok.tolist()) if not good}
        picked, failures = [], {}
        for i in range(len(self.rows)):
            one = copy.copy(self.sampler)  # keep() replaces its tensors, so the batch's sampler is untouched
            one.keep([i])
            try:
                token, ok = one.sample(self.logits[i:i + 1])
                picked.append(int(token[0]))
                if not bool(ok[0]):
                    failures[i] = NOT_A_DISTRIBUTION
            except Exception as e:
                picked.append(0)
                failures[i] = f"generation failed: {type(e).__name__}: {e}"
        return torch.tensor(picked, dtype=torch.long, device=self.device), failures

    def _fail(self, jobs: list[Job], message: str) -> None:
        """Fail these jobs alone: their rows leave the batch and each gets an "error" event."""
        ids = {id(j) for j in jobs}
        self._drop([i for i, r in enumerate(self.rows) if id(r.job) in ids])
        for job in jobs:
            job.error = message
            job.emit(Event("error", -1, message))

    def _drop(self, gone: list[int]) -> None:
        if not gone:
            return
        gone_set = set(gone)
        keep = [i for i in range(len(self.rows)) if i not in gone_set]
        with self.cond:
            self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.sampler = self.logits = None
            return
        self.cache.keep(keep)
        self.sampler.keep(keep)
        self.logits = self.logits[keep]

    def _fail_all(self, message: str, admitted: list[Job]) -> None:
        """The batch's shared state broke: fail every running job and every job popped for admission that has
        no answer yet (none is left waiting for ever)."""
        jobs = {id(r.job): r.job for r in self.rows}
        jobs.update({id(j): j for j in admitted if j.error is None and not j.done})
        with self.cond:
            self.rows = []
        self.cache = self.sampler = self.logits = None
        for job in jobs.values():
            job.error = message
            job.emit(Event("error", -1, message))
