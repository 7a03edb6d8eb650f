"""`partinfer serve` with real peers: the official `openai` client, raw HTTP for bad input, a load of
concurrent streaming clients, and the chat page in a real headless Chromium. Loopback only."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from partinfer.cli.app import app
from partinfer.runtime.sparsity import SparsityConfig

PROMPT = "Name three colours."
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m partinfer.cli serve ...` on a free loopback port, stopped at the end."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "partinfer.cli", "serve", "--port", str(self.port), *args], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("the server did not start within 180 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny_args(tiny_with_tokenizer) -> list[str]:
    return ["--model", str(tiny_with_tokenizer / "model"), "--model-neurons", str(tiny_with_tokenizer / "neurons.safetensors"),
            "--dtype", "fp32"]


@pytest.fixture(scope="module")
def server(tiny_args):
    running = ServerProcess(*tiny_args, "--context", "96", "--max-queue", "4")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def generated_text(tiny_args: list[str], *options: str) -> str:
    import json

    result = runner.invoke(app, ["generate", "-p", PROMPT, *tiny_args, *options, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["text"]


def test_models_lists_the_model(client, tiny_with_tokenizer):
    assert [m.id for m in client.models.list().data] == [(tiny_with_tokenizer / "model").name]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 7}])
def test_chat_equals_partinfer_generate(client, tiny_args, sampling):
    options = ["-n", "12"] + (["--temperature", "0.8", "--seed", "7"] if sampling else [])
    expected = generated_text(tiny_args, *options)
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model="any", messages=messages, max_tokens=12, **sampling)
    assert whole.choices[0].message.content == expected
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 5
    assert whole.model_extra["partinfer"]["method"] == SparsityConfig().method  # the default
    assert abs(whole.model_extra["partinfer"]["computed_fraction"] - whole.model_extra["partinfer"]["loaded_fraction"]) > 0
    streamed = client.chat.completions.create(model="any", messages=messages, max_tokens=12, stream=True, **sampling)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_text_completion_and_stop_strings(client):
    whole = client.completions.create(model="any", prompt="One, two, three,", max_tokens=10)
    text = whole.choices[0].text
    assert text and whole.usage.completion_tokens >= 1
    if len(text) > 2:  # stop at a string the greedy answer is known to contain: the text ends before it
        stop = text[1:3]
        cut = client.completions.create(model="any", prompt="One, two, three,", max_tokens=10, stop=[stop])
        assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", "not valid JSON"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 200}]}, "context"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, "context"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n=2"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "caf\udce9"}]}, "UTF-8"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")}, "temperature"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}", "body"),
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff\xfe hi"}]}', "body"),
]


@pytest.mark.parametrize("path, body, fragment", BAD_REQUESTS)
def test_bad_input_is_a_4xx_and_the_server_goes_on(server, path, body, fragment):
    if isinstance(body, bytes):
        response = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"})
    else:
        import json

        raw = json.dumps(body, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")
        response = httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert fragment in error["message"] or fragment == error.get("param"), error
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_huge_body_gets_413_while_health_keeps_answering(server):
    """A 50 MiB chat message is refused before it is read (an OpenAI error object), and the server goes on."""
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (50 << 20) + b'"}]}'
    answers = {}

    def post() -> None:
        answers["big"] = httpx.post(server.url + "/v1/chat/completions", content=big,
                                    headers={"Content-Type": "application/json"}, timeout=60)

    thread = threading.Thread(target=post)
    thread.start()
    t0 = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    assert time.monotonic() - t0 < 1.0
    thread.join(60)
    assert answers["big"].status_code == 413 and answers["big"].json()["error"]["code"] == "body_too_large"


def test_a_foreign_host_header_is_refused(server):
    """DNS rebinding: a request that names another host is not served; loopback names are."""
    refused = httpx.get(server.url + "/v1/models", headers={"Host": "evil.example:8000"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(server.url + "/v1/models", headers={"Host": "localhost"}).status_code == 200


def test_unknown_routes_and_methods_are_openai_error_objects(server):
    for response, status in ((httpx.get(server.url + "/v1/nothing"), 404), (httpx.get(server.url + "/v1/completions"), 405)):
        assert response.status_code == status and set(response.json()["error"]) >= {"message", "type"}


def test_unknown_fields_are_ignored(server):
    body = {"messages": [{"role": "user", "content": "hi", "name": "me"}], "max_tokens": 2,
            "frequency_penalty": 0.5, "user": "x", "some_future_option": {"a": 1}}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text


def test_load_of_concurrent_streaming_clients(tiny_args, capsys):
    """32 concurrent streaming clients, every fourth disconnecting after its first piece; the queue bound
    answers 429 (clients retry after Retry-After) instead of growing; memory returns to its level."""
    import psutil

    running = ServerProcess(*tiny_args, "--context", "128", "--max-queue", "8")
    try:
        prompts = [f"Tell me about number {i}." for i in range(8)]
        expected = {}
        for p in prompts:  # the answers, one request at a time (greedy)
            r = httpx.post(running.url + "/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": p}], "max_tokens": 16}, timeout=120)
            expected[p] = r.json()["choices"][0]["message"]["content"]
        rss_before = psutil.Process(running.proc.pid).memory_info().rss
        results, lock = [], threading.Lock()

        def one_client(i: int) -> None:
            prompt, cancel = prompts[i % len(prompts)], i % 4 == 3
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "stream": True}
            rejected, started = 0, time.perf_counter()
            with httpx.Client(timeout=300) as http:
                while True:
                    with http.stream("POST", running.url + "/v1/chat/completions", json=body) as response:
                        if response.status_code == 429:
                            rejected += 1
                            time.sleep(float(response.headers["Retry-After"]) * 0.2)
                            continue
                        text, first = "", None
                        for line in response.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            import json

                            delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content") or ""
                            if delta and first is None:
                                first = time.perf_counter() - started
                            text += delta
                            if cancel and text:
                                break  # leave mid-stream: the server must cancel and free the slot
                        with lock:
                            results.append({"prompt": prompt, "text": text, "cancel": cancel, "rejected": rejected,
                                            "latency": time.perf_counter() - started, "ttft": first})
                        return

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one_client, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        wall = time.perf_counter() - t0
        assert len(results) == 32
        for r in results:
            if not r["cancel"]:
                assert r["text"] == expected[r["prompt"]]
        assert sum(r["rejected"] for r in results) > 0  # the bound held: 429s, not an unbounded queue
        time.sleep(1.0)
        assert httpx.get(running.url + "/health").json()["queued"] == 0  # cancelled requests freed their places
        rss_after = psutil.Process(running.proc.pid).memory_info().rss
        assert rss_after < rss_before * 1.10 + 32 * 2**20, (rss_before, rss_after)
        done = [r for r in results if not r["cancel"]]
        latencies = sorted(r["latency"] for r in done)
        ttfts = sorted(r["ttft"] for r in done if r["ttft"] is not None)
        with capsys.disabled():
            print(f"\nload: 32 clients (8 leaving mid-stream) in {wall:.1f} s = {len(results) / wall:.1f} requests/s; "
                  f"latency p50 {statistics.median(latencies):.2f} s, p95 {latencies[int(0.95 * (len(latencies) - 1))]:.2f} s; "
                  f"first token p50 {statistics.median(ttfts):.2f} s; 429s {sum(r['rejected'] for r in results)}; "
                  f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    finally:
        running.stop()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: `apt-get install chromium` (.ci/run installs it)")
def test_the_chat_page_streams_an_answer_in_a_real_browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#question", PROMPT)
            page.press("#question", "Enter")
            page.wait_for_function("document.querySelector('.stats') && "
                                   "/tok\\/s|error/.test(document.querySelector('.stats').textContent)", timeout=120_000)
            assert "error" not in page.text_content(".stats"), page.text_content(".stats")
            assert page.text_content(".user") == "You: " + PROMPT
            assert page.text_content(".assistant").strip()
            assert "FFN neurons computed" in page.text_content(".stats")
        finally:
            browser.close()


def test_a_conversation_that_extends_the_cache_reuses_it_and_answers_as_a_fresh_start(tiny_with_tokenizer):
    """The next turn of a conversation prefills only its new tokens; with every neuron computed (dense)
    the answer equals that of a worker that starts from nothing."""
    from partinfer.runtime.engine import load_engine
    from partinfer.runtime.generate import SamplingConfig
    from partinfer.runtime.sparsity import SparsityConfig
    from partinfer.runtime.text import encode_messages
    from partinfer.server.worker import ModelWorker, ServeConfig

    engine = load_engine(str(tiny_with_tokenizer / "model"), "fp32", "cpu", SparsityConfig(method="dense"))
    config = ServeConfig(model_name="tiny", method="dense", context=256)
    first_turn = [{"role": "user", "content": PROMPT}]

    def answer(worker: ModelWorker, messages: list[dict]) -> str:
        ids = encode_messages(engine.tokenizer, messages)
        assert worker.admit()
        return worker.submit(worker.job_for(ids, 8, SamplingConfig(), [])).result().text

    reused = ModelWorker(engine, config)
    reply = answer(reused, first_turn)
    second = first_turn + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And two more?"}]
    held = list(reused.cached_tokens)
    second_ids = encode_messages(engine.tokenizer, second)
    extends = second_ids[: len(held)] == held
    got = answer(reused, second)
    assert got == answer(ModelWorker(engine, config), second)
    assert extends, "the chat template re-rendered the first turn; the cache could not be reused"


def test_a_taken_port_is_a_one_line_error(tiny_args):
    from tests.test_cli import assert_clean_error

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_clean_error(runner.invoke(app, ["serve", "--port", str(port), *tiny_args]), "cannot listen", str(port))


def test_port_zero_prints_the_real_port(tiny_args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "partinfer.cli", "serve", "--port", "0", *tiny_args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 180
        while "http://127.0.0.1:" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited"
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        assert port > 0
        for _ in range(100):
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("no answer on the printed port")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_idle_connections_are_closed(tiny_args):
    """Sockets that never send a request, or only part of one, are closed after --idle-timeout; a
    request after the timeout on a fresh connection is still answered."""
    running = ServerProcess(*tiny_args, "--context", "64", "--idle-timeout", "1")
    try:
        idle = [socket.create_connection(("127.0.0.1", running.port), timeout=10) for _ in range(40)]
        idle[0].sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a head never finished
        t0 = time.monotonic()
        for s in idle:
            assert s.recv(1024) == b"", "the server kept an idle connection open"  # b"": closed by the server
            s.close()
        assert time.monotonic() - t0 < 5
        assert httpx.get(running.url + "/health", timeout=5).status_code == 200
    finally:
        running.stop()


@pytest.fixture(scope="module")
def long_context_model(tiny_with_tokenizer, tmp_path_factory) -> list[str]:
    """The tiny model with room for thousands of positions (same weights; rotary positions need no table),
    so one reply can be long enough to outlast its client."""
    import json

    model = shutil.copytree(tiny_with_tokenizer / "model", tmp_path_factory.mktemp("long") / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    return ["--model", str(model), "--model-neurons", str(tiny_with_tokenizer / "neurons.safetensors"), "--dtype", "fp32"]


def test_a_non_streaming_client_that_leaves_cancels_its_generation(long_context_model):
    """A `stream: false` request for thousands of tokens whose client gives up after 0.5 s: its generation
    stops (the queue is empty again within a second) and the next request is answered at once."""
    running = ServerProcess(*long_context_model, "--context", "8192")
    try:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8000}
        t0 = time.monotonic()
        full = httpx.post(running.url + "/v1/chat/completions", json={**body, "max_tokens": 2000}, timeout=300)
        per_token = (time.monotonic() - t0) / max(full.json()["usage"]["completion_tokens"], 1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(running.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.5))
        left = time.monotonic()
        while httpx.get(running.url + "/health").json()["queued"] and time.monotonic() - left < 5:
            time.sleep(0.02)
        freed = time.monotonic() - left
        assert freed < 1.0, f"the worker stayed busy {freed:.1f} s after its client left ({per_token * 1e3:.1f} ms a token)"
        quick = httpx.post(running.url + "/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=30)
        assert quick.status_code == 200
    finally:
        running.stop()
