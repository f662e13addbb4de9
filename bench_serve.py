"""
Load test of a running serve.py: time to first token, tokens/s and requests/s with 1, 2, 4, 8 and
16 clients streaming chat answers at once.

    python serve.py --ckpt=out/quickstart/chat &                # in another terminal, or in the background
    python bench_serve.py                                       # http://127.0.0.1:8000, 1 to 16 clients
    python bench_serve.py --clients=1,8 --max_tokens=32 --requests=2 --url=http://127.0.0.1:8080

Each client sends `requests` streamed chat requests one after the other (a short question,
max_tokens answer tokens, temperature 0.8); a first request per client, untimed, warms the server.
Figures: the median (p50) and 95th percentile (p95) time from sending a request to its first text;
answer tokens (from the server's usage counts) per second of wall time, all clients together;
requests per second. To compare with one answer at a time, run the server with --max_batch=1.
"""

import math
import statistics
import threading
import time
from dataclasses import dataclass

from gptkit.configurator import BaseConfig, configure
from gptkit.system import run_main


@dataclass
class BenchServeConfig(BaseConfig):
    url: str = "http://127.0.0.1:8000"  # the server
    api_key: str = ""                   # if the server was started with --api_key
    clients: str = "1,2,4,8,16"         # numbers of concurrent clients, one run each
    requests: int = 2                   # timed requests per client
    max_tokens: int = 64                # answer length asked for
    prompt: str = "Tell me about rivers."

    def validate(self):
        problems = super().validate()
        if not all(part.strip().isdigit() and int(part) > 0 for part in self.clients.split(",")):
            problems.append(f"clients={self.clients!r}: use numbers such as 1,4,16")
        if self.requests < 1 or self.max_tokens < 1:
            problems.append("requests and max_tokens: use 1 or more")
        return problems


def one_request(client, cfg):
    """-> (seconds to the first text, answer tokens)."""
    start, first, tokens = time.perf_counter(), None, 0
    stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": cfg.prompt}],
                                            max_tokens=cfg.max_tokens, temperature=0.8, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first if first is not None else time.perf_counter() - start, tokens


def run(client, cfg, clients):
    results, ready = [], threading.Barrier(clients + 1)

    def one_client():
        one_request(client, cfg)  # warm-up, untimed: connections, the server's first answers
        ready.wait()
        for _ in range(cfg.requests):
            results.append(one_request(client, cfg))

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for t in threads:
        t.start()
    ready.wait()  # every client has warmed up: the clock starts for all at once
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(t for t, _ in results)
    p95 = ttfts[min(len(ttfts) - 1, math.ceil(0.95 * len(ttfts)) - 1)]  # nearest rank
    return statistics.median(ttfts), p95, sum(n for _, n in results) / wall, len(results) / wall


def main(cfg):
    import openai  # a dev requirement (requirements-dev.txt), not gptkit's: the config check works without it
    client = openai.OpenAI(base_url=cfg.url.rstrip("/") + "/v1", api_key=cfg.api_key or "none", max_retries=0)
    card = client.models.list().data[0]
    print(f"{card.id}: {card.parameters:,} parameters; {cfg.max_tokens} tokens per answer, "
          f"{cfg.requests} timed requests per client")
    print("| clients | time to first token p50 | p95 | tokens/s (all clients) | requests/s |")
    print("|---|---|---|---|---|")
    for clients in (int(part) for part in cfg.clients.split(",")):
        ttft, p95, tokens_per_sec, requests_per_sec = run(client, cfg, clients)
        print(f"| {clients} | {ttft * 1000:,.0f} ms | {p95 * 1000:,.0f} ms | {tokens_per_sec:.1f} | {requests_per_sec:.2f} |",
              flush=True)


if __name__ == "__main__":
    run_main(main, configure(BenchServeConfig))
