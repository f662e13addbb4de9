"""gptkit/engine.py in-process: the continuous batch answers as each request would be answered alone,
logprobs are the model's, the queue limit refuses at once, and a cancelled answer frees its row."""

import asyncio
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from gptkit.engine import Engine, Job, Overloaded, answer_all
from gptkit.generate import generate
from gptkit.tokenizer import load_tokenizer
from test_generate import lively_model, one_thread  # noqa: F401 (one thread for the tiny model)

GPT2 = load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model():
    return lively_model(block_size=256)


def prompts(count):
    """Prompts of different lengths (2 to 3*count tokens)."""
    return [[GPT2.eot] + GPT2.encode("word " * (3 * i + 1)) for i in range(count)]


async def answer_ids(engine, job):
    """A job's answers as token ids (from its logprobs entries) and finish reasons."""
    ids, finishes = [[] for _ in range(job.n)], [None] * job.n
    async for event in engine.submit(job).events():
        if event[0] == "text":
            ids[event[1]] += [token for token, _, _ in event[3]]
        elif event[0] == "end":
            finishes[event[1]] = event[2]
    return ids, finishes


def run_all(engine, jobs):
    async def together():
        return await asyncio.gather(*(answer_ids(engine, job) for job in jobs))
    return asyncio.run(together())


def test_a_batch_of_different_prompt_lengths_answers_each_as_alone(model):
    """12 greedy requests, 4 rows: requests join as others leave, prompts of 2 to 35 tokens (a chunked
    prefill for the long ones, prefill_chunk=8) share each step, and each answer equals generate()'s."""
    engine = Engine(model, GPT2, max_batch=4, max_queue=32, prefill_chunk=8)
    try:
        lengths = [1 + 3 * i for i in range(12)]  # answers of different lengths (one of 1 token): rows leave at different steps
        alone = [list(generate(model, p, n, temperature=0, n_vocab=GPT2.n_vocab)) for p, n in zip(prompts(12), lengths)]
        got = run_all(engine, [Job(p, n, (), temperature=0, logprobs=0) for p, n in zip(prompts(12), lengths)])
        assert [ids for (ids,), _ in got] == alone and len({tuple(a) for a in alone}) == 12
        assert all(finishes == ["length"] for _, finishes in got)
        deadline = time.time() + 60  # a guard against a hang, not a bound: the row leaves within a step
        while engine.health()["batch"] and time.time() < deadline:  # the last row leaves just after its end event
            time.sleep(0.01)
        health = engine.health()
        assert health["completed"] == 12 and health["batch"] == 0 and health["tokens_generated"] == sum(lengths)
    finally:
        engine.close()


def test_logprobs_are_the_models_log_softmax_and_seeds_repeat(model):
    engine = Engine(model, GPT2, max_batch=4)
    try:
        ids = prompts(3)[2]
        job = Job(ids, 4, (), temperature=1.0, seed=5, n=3, logprobs=3)
        entries = []

        async def collect():
            async for event in engine.submit(job).events():
                if event[0] == "text" and event[1] == 0:
                    entries.extend(event[3])
        asyncio.run(collect())
        seq = ids + [token for token, _, _ in entries]
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0][0, len(ids) - 1:-1, :GPT2.n_vocab]  # (4, n_vocab)
        expected = F.log_softmax(logits.float(), dim=-1)
        for t, (token, logprob, top) in enumerate(entries):
            assert logprob == pytest.approx(float(expected[t, token]), abs=1e-4)
            values, best = expected[t].topk(3)
            assert [i for i, _ in top] == best.tolist()
            assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-4)
        # n=3 with one seed: three rows, three different answers, the same three again
        first = run_all(engine, [Job(ids, 8, (), temperature=1.0, seed=5, n=3, logprobs=0)])[0][0]
        again = run_all(engine, [Job(ids, 8, (), temperature=1.0, seed=5, n=3, logprobs=0)])[0][0]
        assert first == again and len({tuple(a) for a in first}) == 3
    finally:
        engine.close()


def test_a_full_queue_refuses_at_once_and_a_cancelled_answer_frees_its_row(model):
    engine = Engine(model, GPT2, max_batch=1, max_queue=2)

    async def scenario():
        long = engine.submit(Job(prompts(1)[0], 200, (), temperature=0))
        events = long.events()
        assert (await events.__anext__())[0] == "text"  # it runs, in the only row
        waiting = [engine.submit(Job(prompts(1)[0], 2, (), temperature=0)) for _ in range(2)]
        with pytest.raises(Overloaded) as refused:
            engine.submit(Job(prompts(1)[0], 2, (), temperature=0))
        assert refused.value.status == 429 and refused.value.retry_after >= 1
        await events.aclose()  # the client leaves: the job is cancelled
        for job in waiting:  # the row is freed at the next step, and the queue runs
            assert [e[0] async for e in job.events()][-1] == "end"
        return engine.health()

    try:
        health = asyncio.run(scenario())
        assert health["cancelled"] == 1 and health["completed"] == 2 and health["rejected"] == 1
        assert health["tokens_generated"] < 100  # the long answer stopped far before its 200 tokens
    finally:
        engine.close()
    with pytest.raises(Overloaded, match="shutting down"):
        asyncio.run(asyncio.sleep(0, engine.submit(Job([1], 1, ()))))


def test_requests_that_arrive_together_are_prefilled_in_one_forward_pass(model, monkeypatch):
    """8 requests of different prompt lengths queued while the model is busy: the next admission
    prefills all 8 in one right-padded call, and each answer is still the one it gets alone."""
    engine = Engine(model, GPT2, max_batch=9, max_queue=16)
    calls, busy, go = [], threading.Event(), threading.Event()
    forward = model.forward

    def recording(ids, **kwargs):
        calls.append(tuple(ids.shape))
        if len(calls) == 1:  # the first request's prefill holds the worker until all 8 are queued
            busy.set()
            go.wait(10)
        return forward(ids, **kwargs)

    alone = [list(generate(model, p, 6, temperature=0, n_vocab=GPT2.n_vocab)) for p in prompts(8)]
    monkeypatch.setattr(model, "forward", recording)
    try:

        async def scenario():
            first = asyncio.ensure_future(answer_ids(engine, Job(prompts(1)[0], 40, (), temperature=0, logprobs=0)))
            while not busy.is_set():
                await asyncio.sleep(0.01)
            together = [asyncio.ensure_future(answer_ids(engine, Job(p, 6, (), temperature=0, logprobs=0)))
                        for p in prompts(8)]
            await asyncio.sleep(0.05)  # every job is in the worker's inbox
            go.set()
            return await asyncio.gather(first, *together)

        got = asyncio.run(scenario())
        assert [ids for (ids,), _ in got[1:]] == alone
        widest = max(len(p) for p in prompts(8))
        assert (8, widest) in calls  # one prefill of the 8 prompts, padded to the longest
        assert sum(1 for b, t in calls if t > 1) == 2  # and no other prefill than the first request's
    finally:
        engine.close()


def test_text_held_back_for_a_stop_string_is_kept_when_a_stop_token_ends_the_answer(model):
    """A token whose text may begin a stop string is held back; when a stop token then ends the
    answer, the stop string never came, so that text is the end of the answer, not lost."""
    for ids in prompts(8):
        first, second, third = generate(model, ids, 3, temperature=0, n_vocab=GPT2.n_vocab)
        if third not in (first, second) and GPT2.decode([second]).strip():
            break
    else:
        pytest.fail("no prompt with three different greedy tokens")
    held = GPT2.decode([second]) + "<never comes>"  # the second token's text may begin it: held back
    engine = Engine(model, GPT2, max_batch=2)
    try:
        answers = answer_all(engine, [Job(ids, 10, (third,), temperature=0, stop=[held]),
                                      Job(ids, 10, (third,), temperature=0)])
    finally:
        engine.close()
    assert answers == [[GPT2.decode([first, second])]] * 2


def test_answer_all_runs_a_threadless_engine_in_the_calling_thread(model, monkeypatch):
    """Engine(thread=False) (rl.py's and the harness's): answer_all steps the model in the caller's
    thread, the answers equal a worker thread's, the engine serves a second call, and a failing step
    is an error for the caller, not a hang."""
    jobs = lambda: [Job(p, 6, (), temperature=0.8, seed=i, n=2) for i, p in enumerate(prompts(5))]  # noqa: E731
    threaded = Engine(model, GPT2, max_batch=4, max_queue=32)
    try:
        expected = answer_all(threaded, jobs())
    finally:
        threaded.close()
    engine = Engine(model, GPT2, max_batch=4, max_queue=32, thread=False)
    assert engine.worker is None
    seen, forward = set(), model.forward

    def recorded(*args, **kwargs):
        seen.add(threading.current_thread())
        return forward(*args, **kwargs)
    monkeypatch.setattr(model, "forward", recorded)
    try:
        assert answer_all(engine, jobs()) == expected
        assert seen == {threading.current_thread()}
        assert answer_all(engine, jobs()[:2]) == expected[:2]  # run() returned and runs again

        def broken(*args, **kwargs):
            raise RuntimeError("out of memory")
        monkeypatch.setattr(model, "forward", broken)
        with pytest.raises(RuntimeError, match="generation failed: RuntimeError: out of memory"):
            answer_all(engine, jobs()[:1])
    finally:
        engine.close()
