"""The continuous-batching scheduler: one background thread owns the model and decodes every running request
together; a new request joins at the next step, a finished or cancelled one leaves. Used by minimind.serve.api.

    sched = Scheduler(model, tokenizer, max_batch=16); sched.start()
    job = sched.submit(prompt_ids, [SamplingParams(...)], emit=print)   # events arrive on the thread
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minimind.generation import Completion, RowState, Sampler, SamplingParams, left_pad, stop_token_ids
from minimind.model import KVCache, MiniMindForCausalLM

log = logging.getLogger("minimind.serve")


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
    cancelled: bool = False
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
    settings travel per row in THE Sampler (Sampler.extend/keep)."""

    def __init__(self, model: MiniMindForCausalLM, tokenizer, max_batch: int = 16, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
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
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="minimind-scheduler", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)
            self.thread = None

    def submit(self, prompt: list[int], params: list[SamplingParams], emit: Callable[[Event], None],
               ignore_eos: bool = False) -> Job:
        """Queue a request; raises QueueFull when `max_queue` requests already wait, ValueError when it can
        never fit (more choices than max_batch, empty prompt)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if not 1 <= len(params) <= self.max_batch:
            raise ValueError(f"n must be between 1 and {self.max_batch} (the server's --max-batch)")
        job = Job(list(prompt), list(params), emit, ignore_eos=ignore_eos)
        job.results = [Completion(prompt_tokens=len(prompt)) for _ in params]
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"server busy: {len(self.waiting)} requests are waiting (the limit, --max-queue) "
                                f"and {len(self.rows)} rows are decoding; retry later")
            self.waiting.append(job)
            self.cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away): it leaves the batch before the next step."""
        with self.cond:
            job.cancelled = True
            self.cond.notify_all()

    def stats(self) -> dict:
        with self.cond:
            return {"running": len({id(r.job) for r in self.rows}), "running_rows": len(self.rows),
                    "waiting": len(self.waiting), "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "steps": self.steps, "peak_batch": self.peak_batch}

    # ---- the scheduler thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.stopping and not self.rows and not self.waiting:
                        self.cond.wait()
                    if self.stopping:
                        return
                    gone = [i for i, r in enumerate(self.rows) if r.job.cancelled]
                    admitted, free = [], self.max_batch - len(self.rows) + len(gone)
                    while self.waiting and len(self.waiting[0].params) <= free:
                        job = self.waiting.popleft()
                        if not job.cancelled:
                            admitted.append(job)
                            free -= len(job.params)
                try:
                    if gone:
                        self._drop(gone)
                    if admitted:
                        self._admit(admitted)
                    if self.rows:
                        self._step()
                except Exception as e:  # a bug or out-of-memory: fail the running jobs, keep serving
                    log.exception("decoding step failed")
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the new prompts together (left-padded, once for all n choices of a job) and join the
        running batch. Padding is masked, so each prompt's logits are those it would get alone."""
        ids, mask = left_pad([j.prompt for j in jobs], self.model.config.pad_token_id, self.device)
        cache = self.model.new_cache(len(jobs), ids.shape[1])
        logits = self.model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]
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
        if self.rows:
            self.cache.join(cache, extra=1)
            self.sampler.extend(sampler)
            self.logits = torch.cat([self.logits, logits.to(self.logits.dtype)])
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
        """Sample one token for every row, hand out the text, drop finished rows, run the model once."""
        tokens = self.sampler(self.logits)
        self.sampler.observe(tokens[:, None])
        now = time.perf_counter()
        finished = []
        for i, (row, t) in enumerate(zip(self.rows, tokens.tolist())):
            job = row.job
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
        if self.rows:
            self.cache.reserve(1)
            self.logits = self.model(tokens[:, None], cache=self.cache, logits_to_keep=1).logits[:, -1]

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

    def _fail_all(self, message: str) -> None:
        jobs = {id(r.job): r.job for r in self.rows}
        with self.cond:
            self.rows = []
        self.cache = self.sampler = self.logits = None
        for job in jobs.values():
            job.emit(Event("error", -1, message))
