"""``lmstack serve --upstream``: a real upstream (a second lmstack server on loopback) behind the proxy."""

import asyncio
import json
import socket
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from lmstack.infer.engine_fake import FakeModel, expected_text  # noqa: E402
from lmstack.serve.config import ServeConfig  # noqa: E402
from lmstack.serve.metrics import parse_metrics  # noqa: E402
from lmstack.serve.server import ServerThread, build_backend  # noqa: E402
from tests.test_serve import request  # noqa: E402


@pytest.fixture
def servers(tmp_path):
    started = []

    def make(**kw):
        cfg = ServeConfig(**kw)
        s = ServerThread(build_backend(cfg), cfg).__enter__()
        started.append(s)
        return s

    try:
        yield make
    finally:
        for s in reversed(started):
            s.stop()
            if hasattr(s.backend, "engine"):
                s.backend.engine.shutdown()


def client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=30,
                         **kw)


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_openai_client_through_the_proxy_streaming_and_not(servers, tmp_path):
    up = servers(model="fake", api_keys=["proxy:UPKEY"])
    log = tmp_path / "proxy.jsonl"
    px = servers(upstream=up.url + "/v1", upstream_api_key="UPKEY", upstream_model="fake", model_name="front",
                 api_keys=["alice:K1"], request_log=str(log))
    c = client(px, api_key="K1")
    assert [m.id for m in c.models.list().data] == ["front"]
    r = c.completions.create(model="front", prompt="abc", max_tokens=5)
    assert r.choices[0].text == expected_text(3, 5) and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == 3
    pieces, reasons = [], []
    for ev in c.completions.create(model="front", prompt="abc", max_tokens=5, stream=True):
        pieces += [ch.text for ch in ev.choices]
        reasons += [ch.finish_reason for ch in ev.choices if ch.finish_reason]
        assert ev.usage is None  # the proxy asked the upstream for usage, the client did not
    assert "".join(pieces) == expected_text(3, 5) and reasons == ["length"]
    chunks = list(c.chat.completions.create(model="front", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4 and len(chunks) >= 5  # relayed chunk by chunk
    whole = c.chat.completions.create(model="front", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content

    # the same guards as the local engine: the client's key, the proxy's validation and metrics
    with pytest.raises(openai.AuthenticationError):
        client(px, api_key="wrong").completions.create(model="front", prompt="a", max_tokens=2)
    status, _, payload = request(px.url, "POST", "/v1/completions", {"prompt": "a", "max_tokens": "5"},
                                 headers={"Authorization": "Bearer K1"})
    assert status == 400 and payload["error"]["param"] == "max_tokens"
    m = parse_metrics(request(px.url, "GET", "/metrics")[2])
    assert m["lmstack_generation_tokens_total"] == 5 + 5 + 4 + 4
    assert m['lmstack_finish_reasons_total{reason="length"}'] == 4
    recs = [json.loads(x) for x in _log_lines(log, 4)]
    assert [r["status"] for r in recs] == [200, 200, 200, 200, 401, 400][: len(recs)] and len(recs) >= 4
    assert {r["key"] for r in recs[:4]} == {"alice"} and recs[1]["completion_tokens"] == 5


def test_upstream_4xx_passes_through_with_its_body(servers):
    up = servers(model="fake", max_seq_len=64, api_keys=["k:UPKEY"])
    px = servers(upstream=up.url, upstream_api_key="UPKEY")
    status, _, payload = request(px.url, "POST", "/v1/completions", {"prompt": "x" * 40, "max_tokens": 30})
    assert status == 400 and payload["error"]["param"] == "max_tokens" and "64" in payload["error"]["message"]
    bad_key = servers(upstream=up.url, upstream_api_key="nope")
    status, _, payload = request(bad_key.url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3})
    assert status == 401 and payload["error"]["type"] == "authentication_error"


def test_upstream_down_is_a_502_with_an_openai_error_body_and_the_proxy_stays_up(servers):
    px = servers(upstream=f"http://127.0.0.1:{closed_port()}/v1")
    for stream in (False, True):
        status, _, payload = request(px.url, "POST", "/v1/completions",
                                     {"prompt": "a", "max_tokens": 3, "stream": stream})
        assert status == 502 and payload["error"]["type"] == "upstream_error"
        assert "unreachable" in payload["error"]["message"]
    with pytest.raises(openai.APIStatusError) as e:
        client(px).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 502
    assert request(px.url, "GET", "/health")[0] == 503  # the latest upstream attempt failed
    assert request(px.url, "GET", "/ready")[0] == 200


def test_upstream_5xx_is_mapped_and_never_crashes(servers):
    class Broken(FakeModel):
        def __call__(self, *args, **kwargs):
            raise RuntimeError("device lost")

    up = servers(model="fake")
    up.backend.engine.model = Broken()  # every step fails: the upstream answers 500
    px = servers(upstream=up.url)
    status, _, payload = request(px.url, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 3})
    assert status == 502 and payload["error"]["type"] == "upstream_error" and "500" in payload["error"]["message"]
    status, _, text = request(px.url, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 3, "stream": True})
    errors = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    assert status == 200 and errors and "error" in errors[-1]  # relayed as the stream's error event
    assert request(px.url, "GET", "/ready")[0] == 200


def test_upstream_503_passes_through_with_its_retry_after(servers):
    up = servers(model="fake")
    px = servers(upstream=up.url)
    up.state.draining = True  # the upstream is shutting down: it answers 503 with Retry-After
    for stream in (False, True):
        status, headers, payload = request(px.url, "POST", "/v1/completions",
                                           {"prompt": "a", "max_tokens": 3, "stream": stream})
        assert status == 503 and payload["error"]["type"] == "upstream_error", payload
        assert "503" in payload["error"]["message"] and int(headers["retry-after"]) >= 1
    assert request(px.url, "GET", "/health")[0] == 503  # the latest upstream attempt failed
    up.state.draining = False
    status, _, payload = request(px.url, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 3})
    assert status == 200 and payload["choices"][0]["text"] == expected_text(1, 3)
    assert request(px.url, "GET", "/health")[0] == 200


def _log_lines(log, n: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(lines := log.read_text().splitlines()) >= n:
            return lines
        time.sleep(0.02)
    raise AssertionError(f"request log {log.name} has fewer than {n} lines after {timeout} s")


def test_slow_upstream_hits_the_deadline(servers, tmp_path):
    log = tmp_path / "proxy.jsonl"
    up = servers(model="fake:50")  # 50 ms a token
    px = servers(upstream=up.url, request_timeout=0.6, request_log=str(log))
    t0 = time.monotonic()
    events = list(client(px).completions.create(model="fake", prompt="a", max_tokens=500, stream=True))
    assert time.monotonic() - t0 < 5
    text = "".join(ch.text for ev in events for ch in ev.choices)
    assert 0 < len(text) < 500 and text == expected_text(1, len(text))
    assert [ch.finish_reason for ev in events for ch in ev.choices if ch.finish_reason] == ["length"]
    rec = json.loads(_log_lines(log, 1)[-1])  # written just after the stream's last chunk
    assert rec["finish_reasons"] == {"0": "deadline"} and rec["status"] == 200
    assert parse_metrics(request(px.url, "GET", "/metrics")[2])['lmstack_finish_reasons_total{reason="deadline"}'] == 1

    up.backend.engine.model.hang = hang = __import__("threading").Event()  # no answer at all
    try:
        t0 = time.monotonic()
        status, _, payload = request(px.url, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 3})
        assert status == 504 and payload["error"]["type"] == "timeout_error" and time.monotonic() - t0 < 3
    finally:
        hang.set()


def test_proxy_queue_is_bounded_with_429_and_retry_after(servers):
    up = servers(model="fake:20")
    px = servers(upstream=up.url, max_slots=2, max_queue=1)

    async def one():
        reader, writer = await asyncio.open_connection("127.0.0.1", px.cfg.port)
        body = json.dumps({"prompt": "a", "max_tokens": 10}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)).decode().lower()
        writer.close()
        return int(head.split()[1]), "retry-after:" in head

    async def many():
        return await asyncio.gather(*(one() for _ in range(8)))

    results = asyncio.run(many())
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 3 and statuses.count(429) >= 1
    assert all(ra for s, ra in results if s == 429)


def test_client_disconnect_closes_the_upstream_stream(servers):
    up = servers(model="fake:20")
    px = servers(upstream=up.url)

    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", px.cfg.port)
        body = json.dumps({"prompt": "a", "max_tokens": 1000, "stream": True}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        seen = 0
        while seen < 3:
            line = await asyncio.wait_for(reader.readline(), 10)
            seen += line.startswith(b"data: {")
        writer.close()

    asyncio.run(go())
    assert up.backend.engine.stats()["running"] == 1
    deadline = time.monotonic() + 5
    while up.backend.engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert up.backend.engine.stats()["running"] == 0
    assert up.backend.engine.tokens_generated < 200  # stopped long before max_tokens
    assert px.backend.stats()["running"] == 0


class _ReasoningUpstream:
    """An OpenAI-compatible upstream that answers with a field lmstack has no name for
    (``reasoning_content``, as reasoning models served by vLLM send it)."""

    def __enter__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if body.get("stream"):
                    pieces = [{"role": "assistant", "reasoning_content": "think "},
                              {"reasoning_content": "hard"}, {"content": "4"}]
                    data = "".join(
                        "data: " + json.dumps({"id": "u", "object": "chat.completion.chunk", "created": 1,
                                               "model": "u", "choices": [{"index": 0, "delta": d, "finish_reason":
                                                                          "stop" if k == 2 else None}]}) + "\n\n"
                        for k, d in enumerate(pieces)) + "data: [DONE]\n\n"
                    ctype = "text/event-stream"
                else:
                    data = json.dumps({"id": "u", "object": "chat.completion", "created": 1, "model": "u",
                                       "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                           "role": "assistant", "content": "4", "reasoning_content": "think hard"}}],
                                       "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
                    ctype = "application/json"
                raw = data.encode()
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_message_fields_without_a_name_in_lmstack_are_relayed(servers):
    with _ReasoningUpstream() as up:
        px = servers(upstream=up.url, port=0)
        c = client(px)
        msgs = [{"role": "user", "content": "2+2?"}]
        whole = c.chat.completions.create(model="m", messages=msgs)
        assert whole.choices[0].message.content == "4"
        assert whole.choices[0].message.model_extra["reasoning_content"] == "think hard"
        chunks = list(c.chat.completions.create(model="m", messages=msgs, stream=True))
        reasoning = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content", "")
                            for ch in chunks if ch.choices)
        assert reasoning == "think hard"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "4"
