"""
Answers for a server: one worker thread runs the generations, one at a time, in the order they
came; the asyncio event loop that talks to the clients only queues jobs and reads their text.

    engine = Engine(model, tokenizer, autocast=rt.autocast)
    job = engine.submit(Job(ids, max_tokens=64, stop_tokens=stop_tokens_of(tokenizer, "chat"), ...))
    async for event in job.events(): ...     # ("text", index, str), then ("end", index, finish_reason, n_tokens)

Why a queue and not a batch: one generation at a time keeps each answer exactly the one a client
would get alone (at temperature 0, token for token), with the same generate() loop sample.py uses,
at the cost of waiting in line. The event loop never runs a forward pass, so /health and new
connections answer at once while the model works.

A job whose client has gone (job.cancel()) stops at its next token, or is skipped if still queued.
A stop string ends an answer early; text that could be the start of one is held back until it is
known not to be, so a client never sees part of a stop string.
"""

import asyncio
import queue
import random
import threading
from dataclasses import dataclass, field

from gptkit.generate import generate, make_generator
from gptkit.tokenizer import StreamDecoder


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


@dataclass
class Job:
    ids: list                       # the prompt's token ids
    max_tokens: int                 # longest answer
    stop_tokens: tuple              # token ids that end an answer (not shown)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: list = field(default_factory=list)  # strings that end an answer (not shown)
    seed: int = None                # None: a fresh random seed
    n: int = 1                      # answers, one after the other
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


class Engine:
    """Runs one model's jobs; tokenizer is that model's (load_model returns the pair): it decodes the
    answers and bounds the ids sampled, so engines of models with different tokenizers can share a process."""

    def __init__(self, model, tokenizer, autocast=None):
        self.model, self.tokenizer, self.autocast = model, tokenizer, autocast
        self.jobs = queue.Queue()
        self.stats = {"completed": 0, "cancelled": 0, "tokens_generated": 0}
        self.busy, self.stopping = False, False
        self.worker = threading.Thread(target=self._work, name="generate", daemon=True)
        self.worker.start()

    def submit(self, job):
        """Queue a job (from inside the event loop); its events arrive through job.events()."""
        job._loop, job._queue = asyncio.get_running_loop(), asyncio.Queue()
        self.jobs.put(job)
        return job

    def health(self):
        return {"busy": self.busy, "queued": self.jobs.qsize(), **self.stats}

    def close(self):
        """Shutting down: the answer in progress stops at its next token, queued ones are never
        started, and their clients' streams end now (rather than be cut off by the server)."""
        self.stopping = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.send("done")
        self.jobs.put(None)  # the worker ends after the job in hand

    def _work(self):
        while (job := self.jobs.get()) is not None:
            self.busy = True
            try:
                for index in range(job.n):
                    if not self._answer(job, index):
                        self.stats["cancelled"] += 1
                        break
                else:
                    self.stats["completed"] += 1
            except Exception as e:  # a failure answers this client and keeps the server up
                job.send("error", f"{type(e).__name__}: {e}")
            finally:
                self.busy = False
                job.send("done")

    def _answer(self, job, index):
        """One answer, streamed to the job as text events -> False if the job was cancelled."""
        if job.cancelled or self.stopping:  # its client left while it waited in line
            return False
        seed = job.seed if job.seed is not None else random.randrange(2**31)
        generator = make_generator(self.model, seed + index)  # n answers with one seed differ
        decoder, stops = StreamDecoder(self.tokenizer), StopStrings(job.stop)
        steps = min(job.max_tokens, self.model.config.block_size - len(job.ids))
        count, finish = 0, None
        for token in generate(self.model, job.ids, job.max_tokens, job.temperature, job.top_k, job.top_p,
                              stop_tokens=job.stop_tokens, generator=generator, autocast=self.autocast,
                              n_vocab=self.tokenizer.n_vocab):  # this model's padding ids are never sampled
            if job.cancelled or self.stopping:
                return False
            count += 1
            self.stats["tokens_generated"] += 1
            text, hit = stops.feed(decoder.feed(token))
            if text:
                job.send("text", index, text)
            if hit:
                finish = "stop"
                break
        if job.cancelled or self.stopping:
            return False
        if finish is None:
            text, hit = stops.feed(decoder.flush())
            text += "" if hit else stops.flush()
            # generate() ends early only at a stop token; all `steps` tokens made means it ran out of room
            finish = "stop" if hit or count < steps else "length"
            if text:
                job.send("text", index, text)
        job.send("end", index, finish, count)
        return True
