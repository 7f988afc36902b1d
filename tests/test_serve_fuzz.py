"""Schema fuzzing: schemathesis drives every operation of /openapi.json with generated requests.

Every check schemathesis has runs (the Python API's equivalent of ``--checks all``): no 5xx,
documented status codes, headers and content types, responses that conform to the spec,
schema-invalid requests refused with a 4xx, and schema-valid requests accepted. The schema
states every limit that does not depend on the model (``protocol.py``), so the only
schema-valid requests allowed a 400 are the ones only the model can decide, each marked by
its error code: prompt + max_tokens past this model's context, token ids outside its
vocabulary, a JSON schema the grammar engine cannot enforce, tool names that do not match.
The fake-token model keeps the examples fast.
"""

import json

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from lmstack.serve.config import ServeConfig  # noqa: E402
from lmstack.serve.server import ServerThread, build_backend  # noqa: E402

MODEL_DEPENDENT = {"context_length_exceeded", "invalid_token_id", "invalid_json_schema", "duplicate_tool_name",
                   "unknown_tool"}


@pytest.fixture(scope="module")
def server():
    cfg = ServeConfig(model="fake", max_seq_len=256, max_slots=8, max_queue=256, embeddings=False,
                      max_body_bytes=200_000)
    s = ServerThread(build_backend(cfg), cfg).__enter__()
    try:
        yield s
    finally:
        s.stop()
        s.backend.engine.shutdown()


def accepted_unless_model_dependent(ctx, response, case):
    """schemathesis' ``positive_data_acceptance``, except for the 400s in ``MODEL_DEPENDENT``."""
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    if response.status_code == 400:
        try:
            code = json.loads(response.content)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if code in MODEL_DEPENDENT:
            return None
    return positive_data_acceptance(ctx, response, case)


def fuzz(server, examples: int) -> dict[str, int]:
    """Examples run per operation and generation mode; fails on the first failed check."""
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {o.path for o in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                            "/v1/models", "/health", "/ready"}
    counts = {}
    for op in operations:
        if op.path in ("/metrics", "/"):
            continue  # plain text and HTML: no schema to conform to
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:
            n = {"count": 0}

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                n["count"] += 1
                case.call_and_validate(excluded_checks=[positive_data_acceptance],
                                       additional_checks=[accepted_unless_model_dependent], timeout=30)

            run()
            counts[f"{op.label} {mode.value}"] = n["count"]
    return counts


def test_schemathesis_all_checks_quick(server):
    counts = fuzz(server, 15)
    assert all(c >= 15 for label, c in counts.items() if label.startswith("POST") and "positive" in label), counts


@pytest.mark.slow
def test_schemathesis_all_checks_200_examples_per_operation(server):
    counts = fuzz(server, 200)
    assert all(c >= 200 for label, c in counts.items() if label.startswith("POST") and "positive" in label), counts
