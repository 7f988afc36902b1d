"""The server under concurrency, disconnects and SIGTERM (the deterministic fake-token model)."""

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lmstack.infer.engine_fake import expected_text  # noqa: E402
from lmstack.serve.config import ServeConfig  # noqa: E402
from lmstack.serve.server import ServerThread, build_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


async def open_stream(port: int, body: dict):
    """POST a streaming request; returns (reader, writer, request id)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    await writer.drain()
    status = await reader.readline()
    assert b" 200 " in status, status
    rid = None
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"x-request-id:"):
            rid = line.split(b":", 1)[1].strip().decode()
    return reader, writer, rid


async def next_event(reader):
    """The next SSE data payload (chunked-encoding size lines and pings skipped); None at the end."""
    while True:
        line = await reader.readline()
        if not line:
            return None
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            return "[DONE]" if payload == b"[DONE]" else json.loads(payload)


def test_64_streams_half_disconnecting_leave_nothing_running(tmp_path):
    log = tmp_path / "requests.jsonl"
    cfg = ServeConfig(model="fake:10", max_slots=64, max_queue=64, request_log=str(log), max_seq_len=4096)
    rng = random.Random(0)
    with ServerThread(build_backend(cfg), cfg) as s:
        engine = s.backend.engine

        async def client(i: int):
            leave_at = rng.randint(1, 15) if i % 2 else None
            body = {"prompt": "a", "max_tokens": 3000 if leave_at else 20, "stream": True}
            reader, writer, rid = await open_stream(cfg.port, body)
            text = ""
            while (ev := await asyncio.wait_for(next_event(reader), 30)) not in (None, "[DONE]"):
                text += ev["choices"][0]["text"]
                if leave_at and len(text) == leave_at:
                    writer.transport.abort()  # vanish mid-stream, as a killed client does
                    return rid, len(text), time.monotonic(), None
            writer.close()
            return rid, len(text), time.monotonic(), text

        async def main():
            return await asyncio.gather(*(client(i) for i in range(64)))

        results = asyncio.run(main())
        deadline = time.monotonic() + 10  # a bound on the wait, not a speed claim: tokens_after_cancel is that
        while time.monotonic() < deadline:
            st = engine.stats()
            if (st["running"], st["waiting"], st["busy_slots"]) == (0, 0, 0):
                break
            time.sleep(0.01)
        st = engine.stats()
        assert (st["running"], st["waiting"], st["busy_slots"]) == (0, 0, 0), st
        finished = [r for r in results if r[3] is not None]
        assert len(finished) == 32 and all(text == expected_text(1, 20) for *_, text in finished)
        # Every disconnected request stopped at once: once the server saw the disconnect and
        # cancelled, the engine generated at most the one step already running for it. (How soon
        # the server sees a vanished client depends on the OS and the event loop, not the engine.)
        engine_handles_wait(log, 64)
        recs = {r["id"]: r for r in map(json.loads, log.read_text().splitlines())}
        for rid, n_read, _, text in results:
            if text is None:
                assert recs[rid]["tokens_after_cancel"] <= 1, recs[rid]
                assert recs[rid]["completion_tokens"] >= n_read
                assert recs[rid]["completion_tokens"] < 3000  # it did stop long before max_tokens


def engine_handles_wait(log: Path, n: int, timeout: float = 10.0):
    """Wait until the request log has ``n`` lines (disconnected requests log once their sequence ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return []
        time.sleep(0.02)
    raise AssertionError(f"request log has fewer than {n} lines after {timeout} s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _spawned(args: list[str], port: int) -> Iterator[subprocess.Popen]:
    """Start ``python args...``, wait until it listens on ``port``, and kill it on the way out
    if the test left it running."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("server did not start: " + proc.stdout.read().decode())
            time.sleep(0.1)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ``lmstack serve`` over a fake model whose every forward blocks: a stuck engine.
STUCK_SERVER = """
import sys, threading
from lmstack.serve.config import ServeConfig
from lmstack.serve.server import build_backend, serve
cfg = ServeConfig(model="fake", port=int(sys.argv[1]), drain_timeout=float(sys.argv[2]))
backend = build_backend(cfg)
backend.engine.model.hang = threading.Event()
sys.exit(serve(cfg, backend))
"""


def _http(port: int, method: str, path: str, body=None):
    from tests.test_serve import request

    return request(f"http://127.0.0.1:{port}", method, path, body)


@pytest.mark.slow
def test_sigterm_drains_in_flight_streams_then_exits_0():
    port = _free_port()
    with _spawned(["-m", "lmstack", "serve", "--model", "fake:25", "--port", str(port), "--drain-timeout", "20"], port) as proc:
        async def main():
            streams = [await open_stream(port, {"prompt": "a", "max_tokens": 40, "stream": True}) for _ in range(8)]
            texts = []
            for reader, _, _ in streams:  # every stream is running
                texts.append((await asyncio.wait_for(next_event(reader), 20))["choices"][0]["text"])
            proc.send_signal(signal.SIGTERM)
            done = []
            for (reader, writer, _), text in zip(streams, texts):
                reasons = []
                while (ev := await asyncio.wait_for(next_event(reader), 30)) not in (None, "[DONE]"):
                    text += ev["choices"][0]["text"]
                    reasons.append(ev["choices"][0]["finish_reason"])
                done.append((text, ev, reasons[-1]))
                writer.close()
            return done

        done = asyncio.run(main())
        for text, last, reason in done:
            assert last == "[DONE]" and reason == "length" and text == expected_text(1, 40)
        assert proc.wait(timeout=30) == 0


@pytest.mark.slow
def test_while_draining_the_listener_stays_open_and_answers_503_with_retry_after():
    port = _free_port()
    with _spawned(["-c", STUCK_SERVER, str(port), "60"], port) as proc:
        async def main():
            reader, writer, _ = await open_stream(port, {"prompt": "a", "max_tokens": 5, "stream": True})
            proc.send_signal(signal.SIGTERM)  # the stream never ends: the drain lasts until the second signal
            deadline = time.monotonic() + 30
            while (ready := await asyncio.to_thread(_http, port, "GET", "/ready"))[0] == 200:
                assert time.monotonic() < deadline, "the server never started draining"
                await asyncio.sleep(0.05)
            new = await asyncio.to_thread(_http, port, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})
            proc.send_signal(signal.SIGTERM)
            rest = await asyncio.wait_for(reader.read(), 30)  # the server closes the stuck stream
            writer.close()
            return ready, new, rest

        ready, new, rest = asyncio.run(main())
        status, headers, body = ready
        assert status == 503 and body["status"] == "draining" and body["detail"]["in_flight"] == 1
        assert 1 <= int(headers["retry-after"]) <= 60
        status, headers, body = new
        assert status == 503 and int(headers["retry-after"]) >= 1 and "shutting down" in body["error"]["message"]
        assert b"[DONE]" not in rest
        assert proc.wait(timeout=30) == 0


@pytest.mark.slow
def test_sigterm_with_a_stuck_engine_exits_after_the_drain_timeout():
    port = _free_port()
    with _spawned(["-c", STUCK_SERVER, str(port), "1"], port) as proc:
        async def main():
            reader, writer, _ = await open_stream(port, {"prompt": "a", "max_tokens": 5, "stream": True})
            proc.send_signal(signal.SIGTERM)
            rest = await asyncio.wait_for(reader.read(), 30)  # cut when the drain timeout passes
            writer.close()
            return rest

        assert b"[DONE]" not in asyncio.run(main())
        # Exits once the 1 s drain is over: well before the 10 s an engine join used to wait on the stuck step.
        assert proc.wait(timeout=8) == 0
