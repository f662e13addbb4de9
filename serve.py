"""
Serve a model over HTTP: a chat page for the browser, and the OpenAI API that curl, the official
`openai` client libraries and most chat front-ends speak.

    python serve.py --ckpt=out/dolly                            # http://127.0.0.1:8000: open it in a browser
    python serve.py --ckpt=out/dolly --port=8080 --device=cpu
    python serve.py --ckpt=out/dolly --host=0.0.0.0 --api_key=SECRET   # reachable from other machines: set a key
    python serve.py --ckpt=out/fineweb_124m                     # a base model: /v1/completions continues text

Endpoints: / (the chat page), /v1/chat/completions and /v1/completions (streamed with
"stream": true, as server-sent events ending in `data: [DONE]`), /v1/models, /health.

    python serve.py --ckpt=out/dolly --max_batch=1              # one answer at a time (the old queue)
    python serve.py --ckpt=out/dolly --dtype=float32            # full precision; auto: bf16 weights on a GPU and on CPUs with bf16 instructions

The chat is rendered, fitted to the context and sampled by the code sample.py uses (gptkit/chat.py,
gptkit/generate.py): at temperature 0 both give the same answer to the same chat. The main thread
(gptkit/engine.py) decodes the concurrent answers as one batch of up to --max_batch rows while the
HTTP server runs in another; requests join it between two steps and leave it when done. More than
--max_queue answers waiting for a row: a 429 with Retry-After at once. A client that disconnects
frees its row at the next step.
Ctrl-C ends the answers in progress (a stream then closes without `data: [DONE]`) and stops.
"""

import hmac
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from gptkit.chat import chat_prompt_ids, complete_prompt_ids, resolve_system, stop_tokens_of
from gptkit.configurator import BaseConfig, UserError, configure
from gptkit.engine import Engine, Job, Overloaded
from gptkit.generate import check_sampling_args
from gptkit.loading import ckpt_arg_problems, load_model
from gptkit.openai_api import (ID_PREFIX, RequestError, chat_messages, completion_prompt, error_body, new_id,
                               parse_json, sampling_fields, stream_chunks, whole_response)
from gptkit.quantize import precision_line, quantize_problems
from gptkit.system import run_main, setup_runtime

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gptkit", "chat_page.html")


@dataclass
class ServeConfig(BaseConfig):
    ckpt: str = ""                  # a run directory (out/dolly) or checkpoint file, or a Hugging Face GPT-2
    host: str = "127.0.0.1"         # this machine only; 0.0.0.0 listens on every network (and requires api_key)
    port: int = 8000                # TCP port
    api_key: str = ""               # when set, /v1/* requires the header `Authorization: Bearer <api_key>`
    name: str = ""                  # the model's name in the API and on the page; empty: the run directory's name
    system: str = "auto"            # system prompt of chats that bring none; auto: the one the model was finetuned with
    temperature: float = 0.8        # for requests that give none (as sample.py); 0 is greedy
    top_k: int = 50                 # for requests that give none: sample among the k most likely tokens; 0: all
    top_p: float = 0.95             # for requests that give none: nucleus sampling; 1: off
    max_new_tokens: int = 256       # answer length for requests that give no max_tokens
    max_tokens_limit: int = 2048    # a request asking more max_tokens gets a 400 (the context caps answers anyway)
    max_messages: int = 200         # a chat request with more messages gets a 400
    max_n: int = 4                  # most answers one request may ask for (n): rows of the batch
    max_batch: int = 0              # answers decoded together; 0: as many as a quarter of the free memory holds (CPU <= 16, GPU <= 64); 1: one at a time
    max_queue: int = 64             # answers that may wait for a row; a request beyond that gets a 429 with Retry-After
    prefill_chunk: int = 512        # most prompt tokens prefilled between two decode steps (long prompts go in chunks)
    max_request_bytes: int = 1_000_000  # a larger request body gets a 413
    quantize: str = "none"          # int8: weight-only int8 matmuls (a quarter of fp32's bytes); fp16: fbgemm's fp16 matmuls (CPU: the fastest without bf16)

    def validate(self):
        problems = super().validate() + ckpt_arg_problems(self.ckpt, example="out/dolly") + quantize_problems(self.quantize)
        if self.host not in LOOPBACK and not self.api_key:  # other machines, or a page's DNS rebinding, get in
            problems.append(f"host={self.host} lets other machines use the model: set --api_key=SECRET too "
                            "(clients then send `Authorization: Bearer SECRET`), or leave --host out for this machine only")
        if not 1 <= self.port <= 65535:
            problems.append(f"port={self.port}: use a TCP port such as 8000")
        for key in ("max_new_tokens", "max_tokens_limit", "max_messages", "max_n", "max_request_bytes", "prefill_chunk"):
            if getattr(self, key) < 1:
                problems.append(f"{key}={getattr(self, key)}: use 1 or more")
        if self.max_batch < 0:
            problems.append(f"max_batch={self.max_batch}: use 0 (sized for the device) or the number of rows")
        if self.max_queue < self.max_n:
            problems.append(f"max_queue={self.max_queue}: use at least max_n ({self.max_n}), or no request of n={self.max_n} "
                            "could ever wait")
        return problems + check_sampling_args(self.temperature, self.top_k, self.top_p, 1.0)


def model_name(cfg):
    if cfg.name:
        return cfg.name
    path = os.path.abspath(cfg.ckpt)
    return os.path.basename(os.path.dirname(path) if os.path.isfile(path) else path)


def check_port(host, port):
    """Fail before the model loads (which can take a while) if the address cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a closing socket is no obstacle
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): check --host, and pick another --port if "
                            "another program uses this one") from e


def error_response(status, message, kind="invalid_request_error", param=None):
    return JSONResponse(error_body(message, kind, param), status_code=status)


def new_app(cfg):
    """A FastAPI app that answers every error in the OpenAI API's shape, and (on this machine only)
    refuses requests that name another host."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # no pages that load scripts from a CDN
    if cfg.host in LOOPBACK:
        # a web page the user visits may point its own host name at 127.0.0.1 (DNS rebinding) to read
        # this server's answers; requests that name another host are refused
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]"])

    @app.exception_handler(RequestError)
    async def request_error(request, e):
        return error_response(e.status, str(e), e.kind, e.param)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # 404 and 405 in the same shape as the API's other errors
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind)

    @app.exception_handler(Exception)
    async def server_error(request, e):  # a bug answers 500 in the API's shape; the traceback stays in the log
        return error_response(500, f"internal error ({type(e).__name__}): see the server's log", "server_error")

    return app


def check_key(cfg, request):
    if cfg.api_key:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
            raise RequestError("missing or wrong API key: send the header `Authorization: Bearer <key>`",
                               status=401, kind="authentication_error")


async def read_request(cfg, request):
    """The request's JSON object, after the key and size checks."""
    check_key(cfg, request)
    raw = b""
    async for chunk in request.stream():  # read in pieces, so a huge body is refused before it is held
        raw += chunk
        if len(raw) > cfg.max_request_bytes:
            raise RequestError(f"the request body is larger than {cfg.max_request_bytes} bytes", status=413)
    return parse_json(raw)


def chat_request_ids(cfg, tokenizer, block_size, messages, max_tokens):
    """A chat request's messages -> the prompt ids, with the server's system prompt unless the chat
    brings its own ("" in it: none)."""
    system = cfg.system
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if not messages:
        raise RequestError("messages holds only a system message: add a user message", param="messages")
    try:
        ids, _ = chat_prompt_ids(tokenizer, system, messages, max_tokens, block_size)
    except ValueError as e:
        raise RequestError(f"{e} (the messages are too long for this model)", param="messages",
                           kind="context_length_exceeded") from e
    return ids


def job_for(tokenizer, ids, settings, mode):
    return Job(ids, settings["max_tokens"], stop_tokens_of(tokenizer, mode), settings["temperature"],
               settings["top_k"], settings["top_p"], settings["stop"], settings["seed"], settings["n"],
               settings["logprobs"])


async def answer(engine, request, ids, settings, kind, model_id):
    """Queue the prompt's job; answer with server-sent events as it goes, or with one JSON object at the end.
    A full queue (or a server shutting down) is a 429 (503) at once, with Retry-After."""
    try:
        job = engine.submit(job_for(engine.tokenizer, ids, settings, kind))
    except Overloaded as e:
        kind_ = "rate_limit_error" if e.status == 429 else "server_error"
        return JSONResponse(error_body(str(e), kind_, code="rate_limit_exceeded" if e.status == 429 else None),
                            status_code=e.status, headers={"Retry-After": str(e.retry_after)})
    id_ = new_id(ID_PREFIX[kind])
    if settings["stream"]:
        chunks = stream_chunks(job, kind, id_, model_id, len(ids), settings["include_usage"], engine.tokenizer)
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await whole_response(job, kind, id_, model_id, len(ids), request.is_disconnected, engine.tokenizer)


def build_app(cfg, engine, card):
    """The FastAPI app serving engine's model. card: what /v1/models says about the model (id,
    parameters, context, ...). Prompts are made with engine.tokenizer, the model's."""
    app = new_app(cfg)
    tokenizer, block_size = engine.tokenizer, engine.model.config.block_size
    defaults = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
                "max_tokens": cfg.max_new_tokens}
    limits = {"max_tokens": cfg.max_tokens_limit, "n": cfg.max_n}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_request(cfg, request)
        messages, settings = chat_messages(body, cfg.max_messages), sampling_fields(body, defaults, limits, "chat")
        ids = chat_request_ids(cfg, tokenizer, block_size, messages, settings["max_tokens"])
        return await answer(engine, request, ids, settings, "chat", card["id"])

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_request(cfg, request)
        prompt, settings = completion_prompt(body), sampling_fields(body, defaults, limits, "complete")
        ids = complete_prompt_ids(tokenizer, prompt, settings["max_tokens"], block_size)  # too long: keeps its end
        return await answer(engine, request, ids, settings, "complete", card["id"])

    @app.get("/v1/models")
    def models(request: Request):
        check_key(cfg, request)
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": card["id"], **engine.health()}

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    return app


def main(cfg):
    check_port(cfg.host, cfg.port)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed, verbose=False, inference=True, quantize=cfg.quantize)
    model, tokenizer, meta = load_model(cfg.ckpt, device=rt.device, dtype=rt.weights_dtype, verbose=False,
                                        quantize=cfg.quantize)
    cfg = replace(cfg, system=resolve_system(cfg.system, meta))  # auto: ask the model as it was trained
    card = {"id": model_name(cfg), "object": "model", "created": int(time.time()), "owned_by": "gptkit",
            "kind": meta.get("kind", "base"), "parameters": model.num_params(),
            "context_length": model.config.block_size, "system_prompt": cfg.system}
    if cfg.compile:
        print("compile=True is ignored by serve.py: it decodes eagerly, as sample.py does", file=sys.stderr)
    # thread=False: the model runs in this thread, which loaded it (a CPU decodes faster there: Engine's
    # docstring), and the HTTP server's event loop in another
    engine = Engine(model, tokenizer, autocast=rt.autocast, max_batch=cfg.max_batch or None,  # the model's own tokenizer
                    max_queue=cfg.max_queue, prefill_chunk=cfg.prefill_chunk, thread=False)
    app = build_app(cfg, engine, card)
    print(f"{card['id']}: {card['kind']} model, {card['parameters']:,} parameters, context {card['context_length']}; "
          f"device {rt.device}, {precision_line(rt, cfg.quantize)}, torch {torch.__version__}; batch of up to {engine.max_batch} answers, "
          f"{engine.max_queue} more may wait", flush=True)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"serving at http://{host}:{cfg.port} (chat page at /, OpenAI API at /v1; Ctrl-C stops)", flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # Ctrl-C: end the answers first, so their streams close cleanly
            engine.close()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                   timeout_graceful_shutdown=2))
    failed, signals = [], []

    def serve_http():
        try:
            server.run()
        except BaseException as e:  # SystemExit: uvicorn's way of saying it could not listen (it logged why)
            failed.append(e)
        finally:
            engine.close()  # the server has stopped: so does the model's loop

    def on_signal(sig, frame):  # uvicorn listens for signals in the main thread only: here, for it
        signals.append(sig)
        server.handle_exit(sig, frame)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=serve_http, name="http", daemon=True)
    http.start()
    try:
        engine.run()  # until engine.close(): a signal, or the server stopped
        http.join()
    finally:
        engine.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed and not server.started:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: pick another --port, or stop what uses it")
    if failed:
        raise failed[0]
    for sig in signals[-1:]:  # stopped by a signal: end as it would have ended us (Ctrl-C: exit code 130)
        signal.raise_signal(sig)


if __name__ == "__main__":
    run_main(main, configure(ServeConfig))
