"""
Load test of a running serve.py: time to first token, tokens/s and requests/s with 1, 2, 4, 8 and
16 clients streaming chat answers at once.

    python serve.py --ckpt=out/quickstart/chat &                # in another terminal, or in the background
    python bench_serve.py                                       # http://127.0.0.1:8000, 1 to 16 clients
    python bench_serve.py --clients=1,8 --max_tokens=32 --requests=2 --url=http://127.0.0.1:8080
    python bench_serve.py --arrivals=steady --requests=4     # clients out of step, as in a chat service
    python bench_serve.py --clients=1,8,16 --json=True       # one JSON line per number of clients, for scripts

Each client sends a first request, then `requests` timed ones, one after the other, streamed (a
short question, temperature 0.8). Two ways to arrive:
- together (the default): the first request is a warm-up; then the clock starts for every client
  at once and every answer is max_tokens long, so each round of requests starts at the same
  instant: the worst case for the first token, which waits for every prompt.
- steady: each answer's length is drawn between max_tokens/2 and 3*max_tokens/2 (seeded), so
  clients fall out of step and a request joins a batch that is already decoding, as people
  chatting at once do. The first requests still start together: their tokens and time count,
  their first-token times do not.
Figures: the median (p50) and 95th percentile (p95) time from sending a request to its first text;
answer tokens (from the server's usage counts) per second of wall time, all clients together;
requests per second. To compare with one answer at a time, run the server with --max_batch=1.
"""

import json
import math
import random
import statistics
import threading
import time
from dataclasses import dataclass

from gptkit.configurator import BaseConfig, UserError, configure
from gptkit.system import run_main


@dataclass
class BenchServeConfig(BaseConfig):
    url: str = "http://127.0.0.1:8000"  # the server
    api_key: str = ""                   # if the server was started with --api_key
    clients: str = "1,2,4,8,16"         # numbers of concurrent clients, one run each
    requests: int = 2                   # timed requests per client
    max_tokens: int = 64                # answer length asked for (steady: the mean)
    arrivals: str = "together"          # together: all clients' requests start at once; steady: answers of varied lengths, clients out of step
    prompt: str = "Tell me about rivers."
    json: bool = False                  # one JSON line per number of clients instead of the table, for scripts

    def validate(self):
        problems = super().validate()
        if not all(part.strip().isdigit() and int(part) > 0 for part in self.clients.split(",")):
            problems.append(f"clients={self.clients!r}: use numbers such as 1,4,16")
        if self.requests < 1 or self.max_tokens < 2:
            problems.append("requests: use 1 or more; max_tokens: use 2 or more")
        if self.arrivals not in ("together", "steady"):
            problems.append(f"arrivals={self.arrivals!r}: use together or steady")
        return problems


def one_request(client, cfg, max_tokens):
    """-> (seconds to the first text, answer tokens)."""
    start, first, tokens = time.perf_counter(), None, 0
    stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": cfg.prompt}],
                                            max_tokens=max_tokens, temperature=0.8, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first if first is not None else time.perf_counter() - start, tokens


def answer_lengths(cfg, seed):
    """max_tokens of a client's warm-up request and its timed ones: the same in every run."""
    if cfg.arrivals == "together":
        return [cfg.max_tokens] * (1 + cfg.requests)
    draw = random.Random(seed)
    return [draw.randint(cfg.max_tokens // 2, cfg.max_tokens * 3 // 2) for _ in range(1 + cfg.requests)]


def run(client, cfg, clients):
    """-> (time to first token p50, p95, tokens/s, requests/s) of one run of `clients` clients."""
    timed, counted, ready = [], [], threading.Barrier(clients + 1)
    together = cfg.arrivals == "together"

    def one_client(seed):
        first, *rest = answer_lengths(cfg, seed)
        result = one_request(client, cfg, first)  # starts with every client's: a burst, never timed
        if together:
            ready.wait()  # untimed: a warm-up; the clock starts when every client has warmed up
        else:
            counted.append(result)  # its tokens count: the wall time below includes it
        for max_tokens in rest:
            timed.append(one_request(client, cfg, max_tokens))

    threads = [threading.Thread(target=one_client, args=(seed,)) for seed in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    if together:
        ready.wait()
        start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(t for t, _ in timed)
    p95 = ttfts[min(len(ttfts) - 1, math.ceil(0.95 * len(ttfts)) - 1)]  # nearest rank
    done = timed + counted
    return statistics.median(ttfts), p95, sum(n for _, n in done) / wall, len(done) / wall


def main(cfg):
    import openai  # a dev requirement (requirements-dev.txt), not gptkit's: the config check works without it
    client = openai.OpenAI(base_url=cfg.url.rstrip("/") + "/v1", api_key=cfg.api_key or "none", max_retries=0)
    try:
        card = client.models.list().data[0]
    except openai.APIConnectionError as e:
        raise UserError(f"no server answers at {cfg.url}: start one first (python serve.py --ckpt=RUN), or "
                        "give its address with --url") from e
    except openai.AuthenticationError as e:
        raise UserError(f"the server at {cfg.url} wants an API key: give the one it was started with, --api_key=KEY") from e
    lengths = f"{cfg.max_tokens}" if cfg.arrivals == "together" else f"{cfg.max_tokens // 2} to {cfg.max_tokens * 3 // 2}"
    if not cfg.json:
        print(f"{card.id}: {card.parameters:,} parameters; {lengths} tokens per answer, {cfg.requests} timed "
              f"requests per client, arriving {cfg.arrivals}")
    one_request(client, cfg, cfg.max_tokens)  # the server's first answer (allocations) is never counted
    if not cfg.json:
        print("| clients | time to first token p50 | p95 | tokens/s (all clients) | requests/s |")
        print("|---|---|---|---|---|")
    for clients in (int(part) for part in cfg.clients.split(",")):
        ttft, p95, tokens_per_sec, requests_per_sec = run(client, cfg, clients)
        if cfg.json:
            print(json.dumps({"clients": clients, "ttft_p50_ms": round(ttft * 1000, 1), "ttft_p95_ms": round(p95 * 1000, 1),
                              "tokens_per_sec": round(tokens_per_sec, 1), "requests_per_sec": round(requests_per_sec, 3),
                              "max_tokens": cfg.max_tokens, "requests": cfg.requests, "arrivals": cfg.arrivals,
                              "model": card.id, "params": card.parameters}), flush=True)
        else:
            print(f"| {clients} | {ttft * 1000:,.0f} ms | {p95 * 1000:,.0f} ms | {tokens_per_sec:.1f} | "
                  f"{requests_per_sec:.2f} |", flush=True)


if __name__ == "__main__":
    run_main(main, configure(BenchServeConfig))
