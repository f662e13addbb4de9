"""
Answers for a server: a continuous batch. One thread runs the model (engine.run()); the asyncio event
loop that talks to the clients, in another, only queues jobs and reads their events.

    engine = Engine(model, tokenizer, autocast=rt.autocast)            # max_batch: by the device's memory
    job = engine.submit(Job(ids, max_tokens=64, stop_tokens=stop_tokens_of(tokenizer, "chat"), ...))
    async for event in job.events(): ...     # ("text", index, str, logprobs), then ("end", index, finish_reason, n_tokens, ids)

Why a batch: decoding one token costs reading every weight once, whether for one sequence or for
eight, so one forward pass that makes a token for each of the running answers serves them all for
about the price of one. Each answer (n answers of a request: n rows) is a row of one KV cache of
max_batch rows, and every row has its own length (model.py's KVCache). Between two decode steps,
waiting answers join: the prompts that fit prefill_chunk tokens together are prefilled in one
forward pass (right-padded, each row its own length) straight into free rows, so clients that
arrive together wait for one prefill; a long prompt is prefilled alone into a staging row, in
chunks of prefill_chunk tokens with a decode step between two, so the running answers never stall
for long, then copied into the first free row (n answers to one prompt: one prefill, n copies). An
answer leaves the batch when it ends (a stop token or string, max_tokens, the context full) or its
client has gone; the last row moves into its place, so the running rows are always 0..n-1 and each
step computes those only. More than max_queue answers waiting: submit raises Overloaded (serve.py
answers 429 with Retry-After) rather than let a client wait minutes.

The same request answered alone and in a batch: alone (one row) the steps are exactly generate()'s,
so at temperature 0 the answer is sample.py's token for token. In a batch of rows of different
lengths, attention is masked per row, and the only difference is rounding: on CPU fp32 a matmul of
8 rows sums in another order than one of 1 row (about 1e-6 on the logits, tests/test_model.py), so
a greedy answer differs only where two tokens tie to within that. Each answer samples with its own
torch.Generator (seed + index), so in fp32 a seed repeats its answer whatever else runs. In bf16
(weights held in bf16: a GPU, or a CPU with bf16 instructions) the rounding is bf16's, a few
hundredths on the logits, and a sampled token near the edge between two can differ: a seed repeats
its answer when asked alone, not always beside other requests.

The event loop never runs a forward pass, so /health and new connections answer at once while the
model works. A job whose client has gone (job.cancel()) leaves the batch at the next step. A stop
string ends an answer early; text that could be the start of one is held back until it is known not
to be, so a client never sees part of a stop string.
"""

import asyncio
import collections
import concurrent.futures
import math
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gptkit.generate import candidate_probs, default_autocast, draw, kv_cache_dtype, make_generator
from gptkit.tokenizer import StreamDecoder

MAX_TOP_LOGPROBS = 20  # as OpenAI's API


class StopStrings:
    """Cuts streamed text before the first stop string; holds back an ending that may begin one."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text):
        """-> (text safe to show, True if a stop string was found: the answer ends here)."""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending = self.pending[:min(found)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self):
        out, self.pending = self.pending, ""
        return out


class Overloaded(Exception):
    """A job the engine cannot take now: status 429 (the queue is full) or 503 (shutting down), and
    the seconds after which a retry may succeed."""

    def __init__(self, message, status, retry_after):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass(eq=False)  # a job is itself: hashed and compared by identity
class Job:
    ids: list                       # the prompt's token ids
    max_tokens: int                 # longest answer
    stop_tokens: tuple              # token ids that end an answer (not shown)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: list = field(default_factory=list)  # strings that end an answer (not shown)
    seed: int = None                # None: a fresh random seed
    n: int = 1                      # answers: n rows of the batch
    logprobs: int = None            # None: none; k >= 0: each token's log-probability and the k most likely
    hide_tokens: tuple = ()         # token ids made but never shown as text (transformers' skip_special_tokens)
    _queue: asyncio.Queue = None
    _loop: asyncio.AbstractEventLoop = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self):
        self._cancelled.set()

    @property
    def cancelled(self):
        return self._cancelled.is_set()

    def send(self, *event):
        """From the worker thread to the job's event loop; a loop already closed drops the event."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            self.cancel()

    async def events(self, disconnected=None):
        """The job's events until it is done. disconnected: an async callable, asked twice a second
        (text or not), True cancels the job. Leaving early (the client went away) cancels it too."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(self._queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    event = None
                if disconnected is not None and loop.time() - checked >= 0.5:
                    checked = loop.time()
                    if await disconnected():
                        return
                if event is None:
                    continue
                if event[0] == "done":
                    return
                yield event
        finally:
            self.cancel()  # nothing if it finished; stops it otherwise


class Answer:
    """One finished answer: its text (what a client is shown), every token id it sampled (the stop
    token that ended it included: what rl.py trains on) and why it ended ("stop", "length")."""

    def __init__(self):
        self.text, self.ids, self.finish_reason = "", [], None


def answer_all(engine, jobs, on_done=None, answers=False):
    """Every job's answers from code that is not async (an evaluation, a script, rl.py's samples) ->
    for each job, the text of each of its answers (answers=True: each as an Answer). All jobs are
    queued at once, so they share the batch as a server's clients do. on_done(): called as each job
    finishes (a progress bar). The event loop runs in a thread of its own, so this works where one
    already runs (a notebook); an Engine(thread=False) runs the model in the calling thread meanwhile."""
    async def answer(job):
        got = [Answer() for _ in range(job.n)]
        async for event in engine.submit(job).events():
            if event[0] == "error":
                raise RuntimeError(f"generation failed: {event[1]}")
            if event[0] == "text":
                got[event[1]].text += event[2]
            elif event[0] == "end":
                got[event[1]].finish_reason, got[event[1]].ids = event[2], event[4]
        if on_done is not None:
            on_done()
        return got if answers else [a.text for a in got]

    async def together():
        return await asyncio.gather(*(answer(job) for job in jobs))

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(asyncio.run, together())
        if engine.worker is None:  # Engine(thread=False): the model runs here, in the caller's thread
            future.add_done_callback(lambda _: engine.inbox.put(None))  # wakes run() to return
            try:
                engine.run(until=future.done)
            except BaseException:  # Ctrl-C: end the jobs, so that the event loop's thread returns too
                engine.close()
                engine.run()
                raise
        return future.result()


class Row:
    """One answer in the batch: its job, sampler and the text it has shown."""

    def __init__(self, job, index, block_size, tokenizer, device):
        self.job, self.index = job, index
        seed = job.seed if job.seed is not None else random.randrange(2**31)
        self.generator = make_generator(device, seed + index)  # n answers with one seed differ
        self.steps = min(job.max_tokens, block_size - len(job.ids))  # prompt + answer stay within the context
        self.decoder, self.stops = StreamDecoder(tokenizer), StopStrings(job.stop)
        self.count, self.token, self.ended = 0, None, False  # token: the last one, fed at the next step
        self.ids = []  # every token sampled, the stop token included
        self.logprobs = []  # entries of the tokens not yet sent


def default_max_batch(model, device):
    """Rows a KV cache of the whole context can have in a quarter of the device's free memory (at
    most 64 on a GPU, 16 on a CPU, where a step of 16 rows already costs several of one)."""
    cfg = model.config
    row_bytes = 2 * cfg.n_layer * cfg.block_size * cfg.n_embd * next(model.parameters()).element_size()
    if device.type == "cuda":
        free, cap = torch.cuda.mem_get_info(device)[0], 64
    else:
        free, cap = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), 16
    return max(1, min(cap, free // 4 // row_bytes))


class Engine:
    """Runs one model's jobs in a continuous batch; tokenizer is that model's (load_model returns the
    pair): it decodes the answers and bounds the ids sampled, so engines of models with different
    tokenizers can share a process. max_batch: rows decoded together (None: default_max_batch; 1: one
    answer at a time, the old queue). max_queue: answers that may wait for a row; more are refused.
    prefill_chunk: most prompt tokens prefilled between two decode steps while answers run. context:
    positions each row holds, prompt and answer (None: the model's block_size; rl.py, whose prompts and
    answers are short, keeps a cache of many rows small with it). thread: run() in a worker thread of
    its own, started here; False: the caller runs run() (serve.py, in the thread that loaded the model).

    Why the thread matters on a CPU: each thread that runs PyTorch ops gets a pool of OpenMP workers of
    its own. Once a second pool exists (the loading thread's, then a worker's), a decode step's hundreds
    of small matmuls run slower in the second: on 2 cores, one int8 matmul took 215 us there against
    165 us in the first, its CPU time 1.5x its wall time instead of 2.0x (the pool's workers idle
    between two ops, as when they sleep rather than spin). A 124M int8 model answered one client at
    26-29 tokens/s from a worker thread and at 38-40 from the thread that loaded it (docs/benchmarks.md)."""

    def __init__(self, model, tokenizer, autocast=None, max_batch=None, max_queue=64, prefill_chunk=512,
                 context=None, thread=True):
        self.model, self.tokenizer = model.eval(), tokenizer  # serving never trains: no dropout
        self.device = next(model.parameters()).device
        self.autocast = autocast or default_autocast(self.device)
        self.max_batch = max_batch or default_max_batch(model, self.device)
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.context = min(context or model.config.block_size, model.config.block_size)
        dtype = kv_cache_dtype(self.device, self.autocast)
        self.cache = model.new_kv_cache(self.max_batch, self.context, dtype=dtype)  # (L, max_batch, nh, context, hs)
        self.staging = model.new_kv_cache(1, self.context, dtype=dtype)  # a joining prompt's prefill
        self.inbox = queue.Queue()  # jobs from submit(), to the worker
        self.waiting = collections.deque()  # (job, index) of answers without a row yet, in arrival order
        self.running = []  # Row of cache row i, i < len(running)
        self.staged = None  # (job, prompt tokens prefilled so far, logits of the last one)
        self.prefilling = []  # the jobs of a prefill together in progress
        self.remaining = {}  # job -> its answers not ended yet
        self.queued = 0  # answers submitted and not yet in a row (the queue limit counts these)
        self.recent = collections.deque()  # (time, tokens) of the last steps, for tokens/s
        self.lock = threading.Lock()
        self.stats = {"completed": 0, "cancelled": 0, "rejected": 0, "tokens_generated": 0}
        self.stopping = False
        self.worker = None
        if thread:
            self.worker = threading.Thread(target=self.run, name="generate", daemon=True)
            self.worker.start()

    # ------------------------------------------------------------------------------------------
    # the event loop's side

    def submit(self, job):
        """Queue a job (from inside the event loop); its events arrive through job.events(). Raises
        Overloaded when max_queue answers already wait, or the engine is shutting down."""
        if self.stopping:
            raise Overloaded("the server is shutting down", 503, 5)
        with self.lock:
            if self.queued + job.n > self.max_queue:
                self.stats["rejected"] += 1
                raise Overloaded(f"{self.queued} answers are waiting, the most this server queues is "
                                 f"{self.max_queue}: retry later", 429, self.retry_after())
            self.queued += job.n
        job._loop, job._queue = asyncio.get_running_loop(), asyncio.Queue()
        self.inbox.put(job)
        return job

    def retry_after(self):
        """Seconds until the queue has room, roughly: the queued answers' tokens at the recent speed."""
        tokens_per_sec = self.tokens_per_sec()
        if not tokens_per_sec:
            return 1
        return max(1, min(60, math.ceil(self.queued * 64 / tokens_per_sec)))  # 64: a typical answer's tokens

    def tokens_per_sec(self):
        """Answer tokens made in the last 10 seconds, per second."""
        now = time.monotonic()
        return sum(n for t, n in list(self.recent) if now - t <= 10) / 10

    def health(self):
        return {"busy": bool(self.running or self.queued), "queued": self.queued, "batch": len(self.running),
                "max_batch": self.max_batch, "max_queue": self.max_queue,
                "tokens_per_sec": round(self.tokens_per_sec(), 1), **self.stats}

    def close(self):
        """Shutting down: the answers in progress stop at the next step, queued ones are never
        started, and their clients' streams end now (rather than be cut off by the server)."""
        self.stopping = True
        self.inbox.put(None)  # wakes the worker, which ends every job it holds

    # ------------------------------------------------------------------------------------------
    # the worker's side

    def run(self, until=None):
        """The model's loop: decodes until close() (then ends every job it holds), or, given until (a
        function), until until() is true and no answer is left (answer_all: its jobs are done)."""
        while not self.stopping:
            if until is not None and until() and not (self.running or self.waiting):  # a staged job still waits
                return
            self._take_jobs(block=not (self.running or self.waiting))
            if self.stopping:
                break
            try:
                self._admit()
                if self.running:
                    self._step()
            except Exception as e:  # a failure answers these clients and keeps the server up
                failed = [row.job for row in self.running] + ([self.staged[0]] if self.staged else []) + self.prefilling
                for job in dict.fromkeys(failed):  # a job whose prompts failed to prefill too: never retried
                    job.send("error", f"{type(e).__name__}: {e}")
                    self._end_job(job, completed=False)
                self.running, self.staged, self.prefilling = [], None, []
                self.cache.reset()
        jobs = [row.job for row in self.running] + [job for job, _ in self.waiting]
        while not self.inbox.empty():
            jobs.append(self.inbox.get())
        for job in dict.fromkeys(j for j in jobs if j is not None):
            job.send("done")

    def _take_jobs(self, block):
        while True:
            try:
                job = self.inbox.get(block=block)
            except queue.Empty:
                return
            if job is None:
                return
            self.remaining[job] = job.n
            self.waiting.extend((job, index) for index in range(job.n))
            block = False

    def _end_job(self, job, completed):
        if self.remaining.pop(job, None) is None:
            return
        dropped = sum(1 for j, _ in self.waiting if j is job)
        if dropped:
            self.waiting = collections.deque(w for w in self.waiting if w[0] is not job)
            with self.lock:
                self.queued -= dropped
        self.stats["completed" if completed else "cancelled"] += 1
        job.send("done")

    def _forward(self, ids, cache, lengths=None):
        """ids (B, T) -> the last position's logits (B, V) in float32 (lengths (B,): right-padded rows,
        each row's last real one); padding ids can never win."""
        with torch.no_grad(), self.autocast():
            logits, _ = self.model(ids, kv_cache=cache, last_only=True, lengths=lengths)  # (B, 1, V)
        logits = logits[:, -1, :].float()  # (B, V)
        logits[:, self.tokenizer.n_vocab:] = float("-inf")  # the padding slots: no text, never a target
        return logits

    def _admit(self):
        """Waiting answers join the batch while it has free rows. Prompts that fit prefill_chunk tokens
        together are prefilled together, in one forward pass straight into their rows (8 clients that
        arrive at once wait for one prefill, not eight). Any other (a long prompt, n answers for which
        no n rows are free) is prefilled alone in the staging row, at most prefill_chunk tokens while
        other answers run (all of it when none do, as generate() would), then copied into free rows."""
        budget = self.prefill_chunk
        while self.waiting and len(self.running) < self.max_batch:
            group = self._group(budget) if self.staged is None else []
            if group:
                budget -= self._prefill_together(group)
                continue
            job, index = self.waiting[0]
            if job.cancelled:
                self._end_job(job, completed=False)
                continue
            if len(job.ids) == 0 or len(job.ids) >= self.context:
                job.send("error", f"a prompt of {len(job.ids)} tokens: give 1 to {self.context - 1}")
                self._end_job(job, completed=False)
                continue
            if self.staged is None or self.staged[0] is not job:
                self.staged = (job, 0, None)
                self.staging.reset()
            done = self.staged[1]
            if done < len(job.ids):
                if self.running and budget <= 0:
                    break  # a decode step first; the prompt goes on after it
                take = len(job.ids) - done if not self.running else min(budget, len(job.ids) - done)
                chunk = torch.tensor([job.ids[done:done + take]], dtype=torch.long, device=self.device)  # (1, take)
                self.staged = (job, done + take, self._forward(chunk, self.staging))
                budget -= take
                continue
            # the prompt is in the staging row: this answer takes the first free row
            self.waiting.popleft()
            with self.lock:
                self.queued -= 1
            self.cache.copy_row(len(self.running), self.staging, 0)
            row = Row(job, index, self.context, self.tokenizer, self.device)
            self.running.append(row)
            self._sample([row], self.staged[2])
            if not any(j is job for j, _ in self.waiting):
                self.staged = None  # the job's last answer has its row
        self._leave()

    def _group(self, budget):
        """The jobs at the head of the queue that can be prefilled together now: every answer of each
        has a free row, and their prompts, padded to the longest, fit budget tokens. Empty when the
        first job cannot (the staging path takes it, or it is cancelled or its prompt is unservable)."""
        group, rows, width = [], self.max_batch - len(self.running), 0
        for job in dict.fromkeys(j for j, _ in self.waiting):  # waiting jobs in order, each once
            fits = 0 < len(job.ids) < self.context and not job.cancelled
            wider = max(width, len(job.ids))
            if not fits or self.remaining[job] != job.n or job.n > rows or wider * (len(group) + 1) > budget:
                break
            group.append(job)
            rows, width = rows - job.n, wider
        return group

    def _prefill_together(self, jobs):
        """Prefill the jobs' prompts in one forward pass into the free rows (one per job, right-padded),
        copy the prompt of a job of n answers into n - 1 more, and sample each answer's first token
        -> the prompt tokens computed, padding included."""
        first, width = len(self.running), max(len(job.ids) for job in jobs)
        ids = torch.zeros(len(jobs), width, dtype=torch.long, device=self.device)  # (k, width): right-padded
        for i, job in enumerate(jobs):
            ids[i, :len(job.ids)] = torch.tensor(job.ids, dtype=torch.long)
        lengths = torch.tensor([len(job.ids) for job in jobs], dtype=torch.long, device=self.device)  # (k,)
        cache = self.cache.rows(first, first + len(jobs))
        cache.reset()  # free rows: whatever a finished answer left there is overwritten
        self.prefilling = jobs  # still waiting: if the pass fails, run() ends them
        logits = self._forward(ids, cache, lengths)  # (k, V)
        self.prefilling = []
        rows, row_logits = [], []
        for i, job in enumerate(jobs):  # first answers in the prefilled rows, in order
            rows.append(Row(job, 0, self.context, self.tokenizer, self.device))
            row_logits.append(logits[i])
        for i, job in enumerate(jobs):  # then the other answers, each a copy of its prompt's row
            for index in range(1, job.n):
                self.cache.copy_row(first + len(rows), self.cache, first + i)
                rows.append(Row(job, index, self.context, self.tokenizer, self.device))
                row_logits.append(logits[i])
        for _ in rows:
            self.waiting.popleft()
        with self.lock:
            self.queued -= len(rows)
        self.running.extend(rows)
        self._sample(rows, torch.stack(row_logits))
        return len(jobs) * width

    def _step(self):
        """One token for every running answer, in one forward pass."""
        tokens = torch.tensor([[row.token] for row in self.running], dtype=torch.long, device=self.device)  # (n, 1)
        logits = self._forward(tokens, self.cache.rows(0, len(self.running)))  # (n, V)
        self._sample(self.running, logits)
        self._leave()

    def _sample(self, rows, logits):
        """Each row's next token from its logits (len(rows), V), rows of the same settings together;
        each samples with its own generator, so its seed decides its answer whatever runs beside it."""
        tokens = [None] * len(rows)
        groups = collections.defaultdict(list)
        for i, row in enumerate(rows):
            groups[(row.job.temperature, row.job.top_k, row.job.top_p)].append(i)
        for (temperature, top_k, top_p), members in groups.items():
            if temperature == 0:  # greedy: top-k / top-p cannot change the argmax
                for i, token in zip(members, logits[members].argmax(dim=-1).tolist()):
                    tokens[i] = token
                continue
            probs, ids = candidate_probs(logits[members], temperature, top_k, top_p)  # (len(members), k or V)
            for j, i in enumerate(members):
                row_ids = None if ids is None else ids[j:j + 1]
                tokens[i] = int(draw(probs[j:j + 1], row_ids, generator=rows[i].generator))
        want = [i for i, row in enumerate(rows) if row.job.logprobs is not None]
        logprobs = F.log_softmax(logits[want], dim=-1) if want else None  # (len(want), V): the model's distribution
        made = 0
        for i, row in enumerate(rows):
            entry = self._logprob_entry(logprobs[want.index(i)], tokens[i], row.job.logprobs) if i in want else None
            made += self._advance(row, tokens[i], entry)
        self.stats["tokens_generated"] += made
        now = time.monotonic()
        self.recent.append((now, made))
        while now - self.recent[0][0] > 10:
            self.recent.popleft()

    def _logprob_entry(self, logprobs, token, top):
        """(token, its log-probability, [(token, log-probability)] of the `top` most likely)."""
        top = min(top, MAX_TOP_LOGPROBS)
        values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0])
        return token, float(logprobs[token]), list(zip(ids.tolist(), values.tolist()))

    def _advance(self, row, token, entry):
        """Row takes its sampled token: text to its client, or its end -> 1 if the token is part of the answer."""
        job = row.job
        row.ids.append(token)
        if token in job.stop_tokens:  # ends the answer, not shown
            self._finish(row, "stop", flush=True)
            return 0
        row.count += 1
        if entry is not None:
            row.logprobs.append(entry)
        text, hit = row.stops.feed("" if token in job.hide_tokens else row.decoder.feed(token))
        if text:
            job.send("text", row.index, text, self._take_logprobs(row))
        if hit:
            self._finish(row, "stop")
        elif row.count == row.steps:  # max_tokens, or the context is full
            self._finish(row, "length", flush=True)
        else:
            row.token = token
        return 1

    def _take_logprobs(self, row):
        out, row.logprobs = row.logprobs, []
        return out if row.job.logprobs is not None else None

    def _finish(self, row, reason, flush=False):
        """The answer ends. flush: at a stop token or the length limit, the text held back (bytes of an
        unfinished character, the start of what might have been a stop string) is the answer's end."""
        if flush:
            text, hit = row.stops.feed(row.decoder.flush())
            text += "" if hit else row.stops.flush()
            reason = "stop" if hit else reason
            if text:
                row.job.send("text", row.index, text, self._take_logprobs(row))
        if row.logprobs:  # tokens held back with their text (part of a stop string)
            row.job.send("text", row.index, "", self._take_logprobs(row))
        row.job.send("end", row.index, reason, row.count, row.ids)
        row.ended = True  # _leave frees its row
        self.remaining[row.job] -= 1
        if self.remaining[row.job] == 0:
            self._end_job(row.job, completed=True)

    def _leave(self):
        """Ended and cancelled answers leave; the last running row moves into each freed one."""
        for i in reversed(range(len(self.running))):
            row = self.running[i]
            if not (row.ended or row.job.cancelled or self.stopping):
                continue
            if not row.ended:  # its client has gone
                self._end_job(row.job, completed=False)
            last = len(self.running) - 1
            if i != last:
                self.cache.copy_row(i, self.cache, last)
                self.running[i] = self.running[last]
            self.running.pop()
        if self.staged and self.staged[0].cancelled:
            self.staged = None
