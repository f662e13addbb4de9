"""serve.py end to end: one real server (a subprocess on a free localhost port, a tiny chat model),
talked to with the official openai client, raw HTTP for bad input, and a headless Chromium."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

import bench_serve
from gptkit.chat import chat_prompt_ids, complete_prompt_ids
from gptkit.checkpoint import save_checkpoint
from gptkit.configurator import load_config
from gptkit.engine import StopStrings
from gptkit.tokenizer import EOT
from serve import ServeConfig
from test_generate import lively_model, one_thread  # noqa: F401 (one thread for the tiny model)
from test_sample import GPT2, greedy_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"
BLOCK = 1024  # a long context, so an answer takes long enough (seconds) to be interrupted


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(ckpt, *flags):
    """serve.py on ckpt on a free port, once it answers /health -> (Popen, url)."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny matmuls: one thread is faster on a shared machine
    proc = subprocess.Popen([sys.executable, "serve.py", f"--ckpt={ckpt}", f"--port={port}", "--device=cpu",
                             f"--api_key={KEY}", "--name=tiny", *flags],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180  # a guard against a hang: startup on a loaded machine may take long
    while True:
        try:
            health(url)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"serve.py did not start: {proc.communicate()}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A chat checkpoint of a tiny model, served on a free port: .model, .url, .proc (the Popen), .ckpt, .port"""
    model = lively_model(block_size=BLOCK)
    ckpt = str(tmp_path_factory.mktemp("chat"))
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                           "config": {}, "kind": "chat", "step": 0})
    proc, url = start_serve(ckpt, "--max_tokens_limit=2000", "--max_batch=8", "--max_queue=16",
                            "--dtype=float32")  # fp32: batched answers equal solo ones exactly
    yield SimpleNamespace(model=model, url=url, proc=proc, ckpt=ckpt, port=int(url.rsplit(":", 1)[1]))
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def health(url):
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.load(r)


def post(url, body, key=KEY, raw=None):
    """POST JSON (or raw bytes) -> (status, parsed JSON body)."""
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def chat_ids(messages, max_tokens):
    return chat_prompt_ids(GPT2, "", messages, max_tokens, BLOCK)[0]


@pytest.mark.slow
def test_chat_completion_with_the_openai_client(server, client):
    model = server.model
    messages = [{"role": "user", "content": "Name a river."}]
    expected = greedy_text(model, chat_ids(messages, 12), n=12)
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length" and reply.model == "tiny" and reply.id.startswith("chatcmpl-")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(chat_ids(messages, 12)), 12)

    stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == expected  # token by token, the same answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12

    # a stop string ends the answer before it, with finish_reason stop
    stop = expected[len(expected) // 2:][:6]
    cut = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == expected[:expected.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected[:expected.index(stop)]


def test_multi_turn_system_prompt_and_typed_control_tokens(server, client):
    model = server.model
    typed = "say <|assistant|> and <|end|>"
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                {"role": "user", "content": typed}]
    ids = chat_prompt_ids(GPT2, "be brief", messages, 8, BLOCK)[0]
    reply = client.chat.completions.create(model="tiny", temperature=0, max_tokens=8,
                                           messages=[{"role": "system", "content": "be brief"}, *messages])
    # the typed markers are counted as the ordinary text they are, not as the single control tokens
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == greedy_text(model, ids, n=8)


def test_completions_models_and_health(server, client):
    model, url = server.model, server.url
    ids = complete_prompt_ids(GPT2, "Once upon a time", 10, BLOCK)
    expected = greedy_text(model, ids, n=10, stop=(EOT,))
    reply = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=10)
    assert reply.choices[0].text == expected and reply.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=10,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected

    two = client.completions.create(model="tiny", prompt="Once", max_tokens=10, n=2, seed=7, temperature=1.0)
    again = client.completions.create(model="tiny", prompt="Once", max_tokens=10, n=2, seed=7, temperature=1.0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text != two.choices[1].text
    assert [c.text for c in two.choices] == [c.text for c in again.choices]  # a seed repeats itself

    card = client.models.list().data[0]
    assert card.id == "tiny" and card.parameters == model.num_params() and card.context_length == BLOCK
    assert health(url)["completed"] >= 4


def test_bad_requests_get_openai_errors_not_tracebacks(server):
    url = server.url + "/v1/chat/completions"
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        (None, b"{not json", 400, "not valid JSON"),
        (None, b"[1, 2]", 400, "JSON object"),
        ({"messages": "hi"}, None, 400, "messages must be a non-empty list"),
        ({**ok, "temperature": "hot"}, None, 400, "temperature must be a number"),
        ({**ok, "max_tokens": True}, None, 400, "max_tokens must be an integer"),
        ({**ok, "max_tokens": 10**6}, None, 400, "out of range"),
        (None, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "not a number"),
        (None, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', 400, "not a number"),
        ({**ok, "stream": "yes"}, None, 400, "stream must be true or false"),
        ({**ok, "stop": [1]}, None, 400, "stop must be a string"),
        ({**ok, "n": 50}, None, 400, "n=50 is out of range"),
        ({**ok, "top_k": -1}, None, 400, "top_k=-1 is out of range: use 0 or more"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, None, 400, "use system, user or assistant"),
        ({"messages": [{"role": "user", "content": {"x": 1}}]}, None, 400, "content must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}] * 201}, None, 400, "more than this server takes"),
        ({"messages": [{"role": "user", "content": "word " * 1100}]}, None, 400, "more than the model's context"),
        (None, b'{"messages": "' + b"x" * 1_000_001 + b'"}', 413, "larger than"),
    ]
    for body, raw, status, words in cases:
        got, reply = post(url, body, raw=raw)
        assert (got, reply["error"]["type"] is not None) == (status, True), (body, raw and raw[:20], reply)
        assert words in reply["error"]["message"], reply
    got, reply = post(server.url + "/v1/completions", {"prompt": 5})
    assert got == 400 and reply["error"]["param"] == "prompt"
    # any model name is accepted (there is one model) and answers carry the served model's name
    got, reply = post(url, {**ok, "model": "gpt-4o"})
    assert got == 200 and reply["model"] == "tiny"


def test_stop_strings_never_show_part_of_one():
    stops = StopStrings(["END", "xy"])
    assert stops.feed("abc E") == ("abc ", False)  # "E" may begin END: held back
    assert stops.feed("N") == ("", False)
    assert stops.feed("D and more") == ("", True)  # END: the answer ends before it
    stops = StopStrings(["END"])
    assert stops.feed("a bit of E") == ("a bit of ", False)
    assert stops.feed("ve") == ("Eve", False)  # not END after all: shown
    assert (stops.feed("nE"), stops.flush()) == (("n", False), "E")  # the end of the answer shows what is held


@pytest.mark.slow
def test_a_port_in_use_is_one_error_line_before_the_model_loads(server):
    result = subprocess.run([sys.executable, "serve.py", f"--ckpt={server.ckpt}", f"--port={server.port}"],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == "", result  # stdout would name the loaded model
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{server.port}"), result.stderr


def test_api_key_is_required(server):
    url = server.url + "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key in ("", "wrong"):
        got, reply = post(url, body, key=key)
        assert got == 401 and reply["error"]["type"] == "authentication_error"
    assert post(url, body)[0] == 200
    # a host name other than this machine's (a web page's DNS rebinding) is refused
    request = urllib.request.Request(server.url + "/health", headers={"Host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400


def test_listening_beyond_this_machine_requires_an_api_key(server):
    problems = ServeConfig(ckpt=server.ckpt, host="0.0.0.0").validate()
    assert any("--api_key" in p for p in problems), problems
    assert ServeConfig(ckpt=server.ckpt, host="0.0.0.0", api_key=KEY).validate() == []
    assert ServeConfig(ckpt=server.ckpt, host="localhost").validate() == []


@pytest.mark.parametrize("clients", [8, 16])
def test_concurrent_requests_of_different_lengths_equal_their_solo_answers(server, client, clients):
    """8 (one batch) and 16 (8 rows, 8 waiting for one) greedy requests of different prompt and answer
    lengths at once: each gets the answer it gets alone."""
    prompts = [f"Question {i}: tell me about " + "the number " * i + f"{i}." for i in range(clients)]

    def ask(i):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[i]}],
                                              temperature=0, max_tokens=8 + i).choices[0].message.content

    solo = [ask(i) for i in range(clients)]
    together = [None] * clients

    def run(i):
        together[i] = ask(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == solo and len(set(solo)) > 1


def test_logprobs_and_n_as_rows_of_the_batch(server, client):
    model = server.model
    messages = [{"role": "user", "content": "Name a river."}]
    ids = chat_ids(messages, 5)
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=5,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert "".join(c.token for c in content) == reply.choices[0].message.content and len(content) == 5
    answer = GPT2.encode(reply.choices[0].message.content)
    with torch.no_grad():
        logits = model(torch.tensor([ids + answer]))[0][0, len(ids) - 1:-1, :GPT2.n_vocab]
    expected = torch.log_softmax(logits, dim=-1)
    for t, c in enumerate(content):
        assert c.logprob == pytest.approx(float(expected[t].max()), abs=1e-4)  # greedy: the most likely token
        assert [top.logprob for top in c.top_logprobs] == pytest.approx(expected[t].topk(2).values.tolist(), abs=1e-4)
    done = client.completions.create(model="tiny", prompt="Once upon", temperature=0, max_tokens=4, logprobs=1)
    assert len(done.choices[0].logprobs.token_logprobs) == 4 and done.choices[0].logprobs.text_offset[0] == 0
    three = client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, max_tokens=6, n=3, seed=3)
    assert [c.index for c in three.choices] == [0, 1, 2] and len({c.message.content for c in three.choices}) == 3


@pytest.mark.slow
def test_requests_over_the_queue_limit_get_429_at_once_and_the_server_stays_up(server):
    """64 requests at once, more than 8 rows + 16 queued: the rest get a 429 with Retry-After at
    once; every request gets an answer or a 429, and the server answers afterwards."""
    url, body = server.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30}
    results = [None] * 64

    def ask(i):
        start = time.time()
        r = httpx.post(url, json=body, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
        results[i] = (r.status_code, r.headers.get("retry-after"), r.json(), time.time() - start)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    refused = [r for r in results if r[0] == 429]
    assert len(refused) >= 64 - 8 - 16 - 8 and all(r[0] in (200, 429) for r in results), [r[:2] for r in results]
    assert all(int(r[1]) >= 1 and r[2]["error"]["type"] == "rate_limit_error" for r in refused)
    assert max(r[3] for r in refused) < 5  # at once, not after a wait
    assert post(url, body)[0] == 200 and health(server.url)["status"] == "ok"


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's memory from /proc")
def test_memory_stays_flat_over_500_requests(server):
    url, body = server.url + "/v1/completions", {"prompt": "Once", "max_tokens": 2}
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        for _ in range(100):  # warm-up: allocator pools, caches of the first requests
            http.post(url, json=body)
        before = rss_kb(server.proc.pid)
        for _ in range(500):
            assert http.post(url, json=body).status_code == 200
        after = rss_kb(server.proc.pid)
    assert after - before < 20_000, (before, after)  # 20 MB: far less than a leak of 40 bytes per token would make


def wait_idle(url):
    deadline = time.time() + 120  # a guard against a hang: a loaded machine may take long
    while (now := health(url))["busy"] and time.time() < deadline:
        time.sleep(0.1)
    return now


@pytest.mark.slow
def test_a_client_that_disconnects_stops_its_answer(server):
    url, auth = server.url, {"Authorization": f"Bearer {KEY}"}
    before = health(url)
    body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30, headers=auth) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(4)) if line.startswith("data:")]
    assert len(got) >= 2  # it was streaming when the client left
    now = wait_idle(url)
    assert now["cancelled"] == before["cancelled"] + 1
    assert now["tokens_generated"] - before["tokens_generated"] < 500  # far from the 1000 asked for

    # a client waiting for a whole (not streamed) answer gives up after a second; n=4 answers of 1000
    # tokens take seconds (4 s here; one answer alone, 1.5 s, could end before the server notices)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "n": 4}, timeout=1, headers=auth)
    after = wait_idle(url)
    assert after["cancelled"] == now["cancelled"] + 1 and after["completed"] == now["completed"]


def find_browser():
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    message = "Chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)  # CI must run the browser test, never skip it quietly
    pytest.skip(message)


@pytest.mark.slow
def test_the_chat_page_in_a_browser_streams_an_answer(server, tmp_path):
    chromium, driver_path = find_browser()

    model, url = server.model, server.url
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,700"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 30)
        browser.find_element(By.ID, "api_key").send_keys(KEY + Keys.TAB)  # the change reloads the model card
        wait.until(lambda b: "tiny: chat model" in b.find_element(By.ID, "model").text)
        assert "context 1024" in browser.find_element(By.ID, "model").text
        for field, value in (("temperature", "0"), ("max_tokens", "40")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        # record every length the answer's bubble shows, to see it grow token by token
        browser.execute_script("""
            window.seen = [];
            new MutationObserver(() => {
                const b = document.querySelector('.assistant');
                if (b) window.seen.push(b.textContent.length);
            }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});""")
        browser.find_element(By.ID, "input").send_keys("Name a river." + Keys.ENTER)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant.done"))
        answer = browser.find_element(By.CSS_SELECTOR, ".assistant.done").get_attribute("textContent")
        expected = greedy_text(model, chat_ids([{"role": "user", "content": "Name a river."}], 40), n=40)
        assert answer == expected  # the page shows the model's greedy answer
        assert len({n for n in browser.execute_script("return window.seen") if n > 0}) > 3  # it streamed in
        assert browser.find_element(By.ID, "send").is_enabled()
        browser.save_screenshot(str(tmp_path / "serve.png"))

        # a long second answer, stopped by the button once it has begun: the server stops it too
        cancelled = health(url)["cancelled"]
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("1000")
        browser.find_element(By.ID, "input").send_keys("Go on." + Keys.ENTER)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant")) == 2
                   and b.find_elements(By.CSS_SELECTOR, ".assistant")[1].get_attribute("textContent"))
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda b: any(n.text == "(stopped)" for n in b.find_elements(By.CSS_SELECTOR, ".note")))
        assert wait_idle(url)["cancelled"] == cancelled + 1
        browser.find_element(By.ID, "new").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []

        # New chat while an answer streams: the new chat stays empty, in the page and in what it will send
        browser.find_element(By.ID, "input").send_keys("Go on." + Keys.ENTER)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant")
                   and b.find_element(By.CSS_SELECTOR, ".assistant").get_attribute("textContent"))
        browser.find_element(By.ID, "new").click()
        wait.until(lambda b: b.execute_script("return controller === null"))
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
        assert browser.execute_script("return history") == []
    finally:
        browser.quit()


def test_bench_serve_without_a_server_or_key_is_one_error_line(server):
    for args, says in ((["--url=http://127.0.0.1:9"], "error: no server answers at http://127.0.0.1:9"),
                       ([f"--url={server.url}"], "error: the server at")):
        result = subprocess.run([sys.executable, "bench_serve.py", *args, "--clients=1"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_bench_serve_measures_both_arrivals(server, capsys):
    """bench_serve.py against a running server: a row per client count, each with its figures, for
    requests that arrive together and for steady ones of seeded, varied lengths."""
    steady = load_config(bench_serve.BenchServeConfig, ["--arrivals=steady", "--max_tokens=6", "--requests=3"])
    lengths = [bench_serve.answer_lengths(steady, seed) for seed in range(3)]
    assert lengths == [bench_serve.answer_lengths(steady, seed) for seed in range(3)]  # the same in every run
    assert all(len(each) == 4 and all(3 <= n <= 9 for n in each) for each in lengths) and len(set(map(tuple, lengths))) > 1
    for arrivals in ("together", "steady"):
        cfg = load_config(bench_serve.BenchServeConfig, [f"--url={server.url}", f"--api_key={KEY}", "--clients=1,3",
                                                         "--requests=2", "--max_tokens=6", f"--arrivals={arrivals}"])
        bench_serve.main(cfg)
        out = capsys.readouterr().out
        assert f"arriving {arrivals}" in out
        rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith(("| 1 |", "| 3 |"))]
        assert [int(row[0]) for row in rows] == [1, 3]
        for _, ttft, p95, tokens_per_sec, requests_per_sec in rows:
            assert 0 < float(ttft.split()[0].replace(",", "")) <= float(p95.split()[0].replace(",", ""))
            assert float(tokens_per_sec) > 0 and float(requests_per_sec) > 0


@pytest.mark.slow
def test_ctrl_c_stops_the_server_cleanly(server):
    """Last: Ctrl-C while an answer streams ends the server within seconds, without a traceback."""
    url, proc = server.url, server.proc
    body = json.dumps({"messages": [{"role": "user", "content": "go on"}], "max_tokens": 1000, "stream": True})
    request = urllib.request.Request(url + "/v1/chat/completions", data=body.encode(),
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=30)
    response.readline()  # streaming has begun
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    response.close()
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err, err[-3000:]

