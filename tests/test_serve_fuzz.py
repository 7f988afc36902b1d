"""Schema fuzzing: schemathesis drives every operation of /openapi.json with generated requests.

Checks: no 5xx, documented status codes and content types, and response bodies that
conform to the spec. The fake-token model keeps 200 examples per operation fast.
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, settings  # noqa: E402

from lmstack.serve.config import ServeConfig  # noqa: E402
from lmstack.serve.server import ServerThread, build_backend  # noqa: E402

EXAMPLES = 200


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


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors_and_responses_conform(server):
    from hypothesis import given
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {o.path for o in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    counts = {}
    for op in operations:
        if op.path in ("/metrics", "/"):
            continue  # plain text and HTML: no schema to conform to
        n = {"count": 0}

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case):
            n["count"] += 1
            case.call_and_validate(checks=checks, timeout=30)

        run()
        counts[op.label] = n["count"]
    assert all(c >= EXAMPLES for label, c in counts.items() if label.startswith("POST")), counts
