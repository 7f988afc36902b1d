"""The continuous-batching engine: parity with the plain generation loop, and its invariants."""

import asyncio
import json
import threading
import time

import pytest
import torch

from lmstack import LLM
from lmstack.errors import ConfigError, LMStackError
from lmstack.infer.engine import Engine, EngineConfig, EngineRequest, QueueFull
from lmstack.infer.engine_fake import FakeModel, expected_text
from lmstack.infer.generate import stream_generate
from lmstack.infer.sampling import SamplingParams
from lmstack.tokenizer.byte_level import byte_level_tokenizer

PROMPTS = ["hello world, how are", "a", "the quick brown fox jumps over the lazy dog", "xyz" * 9, "another one"]


@pytest.fixture(scope="module")
def tiny():
    return LLM.load("tiny-llama")


@pytest.fixture
def engine(tiny):
    eng = Engine(tiny.model, tiny.tokenizer, EngineConfig(max_slots=3, max_seq_len=128, prefill_chunk=7,
                                                          token_budget=12)).start()
    try:
        yield eng
    finally:
        eng.shutdown()


def fake_engine(step_seconds=0.0, **kw):
    return Engine(FakeModel(step_seconds=step_seconds), byte_level_tokenizer(), EngineConfig(**kw)).start()


def run_all(handles):
    return ["".join(o.text for o in h) for h in handles]


def test_batched_chunked_greedy_equals_one_by_one_generate(tiny, engine):
    # 5 requests on 3 slots with 7-token prefill chunks: requests wait, join mid-flight and
    # share steps with decoding rows; every output must equal the plain one-sequence loop.
    ids = [tiny.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=24)
    handles = [engine.submit(EngineRequest(x, params)) for x in ids]
    got = run_all(handles)
    want = ["".join(e.text for e in stream_generate(tiny.model, tiny.tokenizer, [x], params)) for x in ids]
    assert got == want
    assert all(h.finish_reason in ("length", "stop") for h in handles)
    assert engine.stats()["busy_slots"] == 0 and engine.cache.lengths == [0, 0, 0]


def test_seeded_sampling_does_not_depend_on_batch_neighbours(tiny, engine):
    x = tiny.tokenizer.encode("sampling test")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    alone = run_all([engine.submit(EngineRequest(x, params))])[0]
    others = [engine.submit(EngineRequest(tiny.tokenizer.encode(p), SamplingParams(max_new_tokens=20, temperature=1.0)))
              for p in PROMPTS[:2]]
    again = engine.submit(EngineRequest(x, params))
    assert run_all([again])[0] == alone
    run_all(others)
    different = run_all([engine.submit(EngineRequest(x, SamplingParams(max_new_tokens=16, temperature=1.0,
                                                                       top_p=0.9, seed=99)))])[0]
    assert different != alone


def test_logprobs_match_the_model_distribution(tiny, engine):
    x = tiny.tokenizer.encode("logprobs")
    outs = list(engine.submit(EngineRequest(x, SamplingParams(max_new_tokens=3, logprobs=True), top_logprobs=3)))
    with torch.no_grad():
        ref = tiny.model(torch.tensor([x]))[0, -1].float()
    ref[tiny.tokenizer.vocab_size:] = float("-inf")
    ref = torch.log_softmax(ref, -1)
    first = outs[0]
    assert first.logprob == pytest.approx(float(ref[first.token_id]), abs=1e-4)
    assert first.top_logprobs[0][0] == first.token_id  # greedy picks the top token
    assert [t for t, _ in first.top_logprobs] == torch.topk(ref, 3).indices.tolist()


def test_stop_strings_and_max_tokens():
    eng = fake_engine(max_slots=2)
    try:
        # The fake model spells the alphabet from position len(prompt).
        h = eng.submit(EngineRequest([97] * 3, SamplingParams(max_new_tokens=20, stop=["gh"], ignore_eos=True)))
        assert run_all([h]) == ["def"] and h.finish_reason == "stop"
        h = eng.submit(EngineRequest([97] * 3, SamplingParams(max_new_tokens=5, ignore_eos=True)))
        assert run_all([h]) == [expected_text(3, 5)] and h.finish_reason == "length"
        assert h.completion_tokens == 5
    finally:
        eng.shutdown()


def test_new_requests_join_a_running_batch_and_long_prompts_do_not_stall_it():
    eng = fake_engine(step_seconds=0.003, max_slots=4, prefill_chunk=16, token_budget=20, max_seq_len=4096)
    try:
        long_stream = eng.submit(EngineRequest([97] * 4, SamplingParams(max_new_tokens=300, ignore_eos=True)))
        first = next(long_stream)
        assert first.text == "e"
        joined_at = long_stream.completion_tokens
        # 1600 prompt tokens at <= 16 per step: ~100 prefill steps, shared with the running stream.
        late = eng.submit(EngineRequest([97] * 1600, SamplingParams(max_new_tokens=3, ignore_eos=True)))
        late_first = next(late)
        progressed = long_stream.completion_tokens - joined_at
        assert late_first.text == expected_text(1600, 1)
        assert progressed >= 90, f"the running stream made only {progressed} tokens during the long prefill"
        assert not long_stream.done  # the late request joined while the first was still running
        assert run_all([late]) == [expected_text(1601, 2)]
        long_stream.cancel()
        list(long_stream)
    finally:
        eng.shutdown()


def test_cancellation_frees_the_slot_within_one_step():
    eng = fake_engine(step_seconds=0.002, max_slots=8)
    try:
        async def main():
            handles = [eng.submit(EngineRequest([97] * (k + 1), SamplingParams(max_new_tokens=5000, ignore_eos=True)))
                       for k in range(8)]
            for k, h in enumerate(handles):
                n = 0
                async for _ in h:
                    n += 1
                    if n == 3 + k:
                        h.cancel()
                        break
            for h in handles:
                await asyncio.wait_for(asyncio.to_thread(h.finished.wait, 5), 6)
            return handles

        handles = asyncio.run(main())
        for h in handles:
            assert h.finish_reason == "cancelled"
            assert h.completion_tokens - h.tokens_at_cancel <= 1
        s = eng.stats()
        assert (s["running"], s["waiting"], s["busy_slots"]) == (0, 0, 0)
    finally:
        eng.shutdown()


def test_bounded_queue_raises_queue_full_and_recovers():
    eng = fake_engine(step_seconds=0.01, max_slots=1, max_queue=2)
    try:
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        accepted = [eng.submit(EngineRequest([97], params)) for _ in range(3)]  # 1 slot + 2 waiting
        with pytest.raises(QueueFull) as e:
            eng.submit(EngineRequest([97], params))
        assert e.value.retry_after >= 1
        assert run_all(accepted) == [expected_text(1, 3)] * 3
        assert run_all([eng.submit(EngineRequest([97], params))]) == [expected_text(1, 3)]
    finally:
        eng.shutdown()


def test_deadline_ends_a_request():
    eng = fake_engine(step_seconds=0.005, max_slots=1)
    try:
        h = eng.submit(EngineRequest([97], SamplingParams(max_new_tokens=10_000, ignore_eos=True),
                                     deadline=time.monotonic() + 0.2))
        outs = list(h)
        assert h.finish_reason == "deadline" and 0 < len(outs) < 10_000
    finally:
        eng.shutdown()


def test_bad_requests_are_rejected_without_harming_the_engine(tiny, engine):
    with pytest.raises(LMStackError, match="empty prompt"):
        engine.submit(EngineRequest([], SamplingParams()))
    with pytest.raises(LMStackError, match="token id"):
        engine.submit(EngineRequest([1, 10_000], SamplingParams()))
    with pytest.raises(LMStackError, match="no room"):
        engine.submit(EngineRequest([1] * 128, SamplingParams()))
    with pytest.raises(ConfigError, match="max_slots"):
        EngineConfig(max_slots=0)
    x = tiny.tokenizer.encode("still fine")
    assert len(run_all([engine.submit(EngineRequest(x, SamplingParams(max_new_tokens=4)))])[0]) > 0


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving():
    model = FakeModel()
    eng = Engine(model, byte_level_tokenizer(), EngineConfig(max_slots=2)).start()
    try:
        real_call = model.__call__
        calls = {"n": 0}

        def flaky(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected")
            return real_call(*a, **kw)

        model.__class__ = type("Flaky", (FakeModel,), {"__call__": lambda self, *a, **kw: flaky(*a, **kw)})
        h = eng.submit(EngineRequest([97], SamplingParams(max_new_tokens=5, ignore_eos=True)))
        with pytest.raises(LMStackError, match="injected"):
            run_all([h])
        h2 = eng.submit(EngineRequest([97], SamplingParams(max_new_tokens=5, ignore_eos=True)))
        assert run_all([h2]) == [expected_text(1, 5)]
        assert eng.alive
    finally:
        eng.shutdown()


def test_json_schema_grammar_output_always_validates(tiny, engine):
    pytest.importorskip("llguidance")
    from lmstack.infer.engine_grammar import GrammarCompiler

    gc = GrammarCompiler(tiny.tokenizer)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tag": {"enum": ["a", "b"]},
                                               "s": {"type": "string", "maxLength": 4}},
              "required": ["n", "tag", "s"], "additionalProperties": False}
    g = gc.json_schema(schema)
    # A random model under the grammar: every sample still parses and fits the schema.
    handles = [engine.submit(EngineRequest(tiny.tokenizer.encode("json"), SamplingParams(
        max_new_tokens=100, temperature=1.0, seed=s), grammar=g)) for s in range(6)]
    for text, h in zip(run_all(handles), handles):
        assert h.finish_reason == "stop", text
        doc = json.loads(text)
        assert set(doc) == {"n", "tag", "s"} and 0 <= doc["n"] <= 99 and doc["tag"] in "ab" and len(doc["s"]) <= 4


def test_batched_grammar_masks_equal_one_row_at_a_time(tiny):
    pytest.importorskip("llguidance")
    from lmstack.infer.engine_grammar import BatchMasks, GrammarCompiler

    gc = GrammarCompiler(tiny.tokenizer)
    schema = {"type": "object", "properties": {"k": {"enum": ["x", "yy"]}}, "required": ["k"]}
    assert gc.json_schema(schema) is gc.json_schema(dict(schema))  # a schema is compiled once
    matchers = [gc.json_schema(schema).matcher() for _ in range(3)]
    for m, text in zip(matchers[1:], ['{"k":', '{"k":"x"}']):  # three parse states, one of them finished
        for t in tiny.tokenizer.encode(text):
            assert m.consume(t)
    V = tiny.model.config.vocab_size + 7  # wider than the tokenizer, as a padded model head is
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    masks = BatchMasks()
    try:
        batched = masks.start(matchers).apply(logits)
    finally:
        masks.close()
    one_by_one = torch.cat([m.mask_logits(logits[i: i + 1]) for i, m in enumerate(matchers)])
    assert torch.equal(batched, one_by_one)
    assert bool(torch.isinf(batched[:, tiny.tokenizer.vocab_size:]).all())
    assert 0 < int(torch.isfinite(batched[0]).sum()) < V


def test_unenforceable_schema_features_are_named(tiny):
    pytest.importorskip("llguidance")
    from lmstack.errors import UnsupportedError
    from lmstack.infer.engine_grammar import GrammarCompiler

    gc = GrammarCompiler(tiny.tokenizer)
    with pytest.raises(UnsupportedError, match="dependentSchemas"):
        gc.json_schema({"type": "object", "dependentSchemas": {"a": {}}})
    with pytest.raises(UnsupportedError, match="format"):
        gc.json_schema({"type": "string", "format": "not-a-format"})


def test_async_and_threaded_consumers_see_the_same_stream():
    eng = fake_engine(max_slots=4)
    try:
        async def consume():
            h = eng.submit(EngineRequest([97] * 2, SamplingParams(max_new_tokens=10, ignore_eos=True)))
            return "".join([o.text async for o in h])

        results = []
        t = threading.Thread(target=lambda: results.append(run_all(
            [eng.submit(EngineRequest([97] * 2, SamplingParams(max_new_tokens=10, ignore_eos=True)))])[0]))
        t.start()
        assert asyncio.run(consume()) == expected_text(2, 10)
        t.join(10)
        assert results == [expected_text(2, 10)]
    finally:
        eng.shutdown()


class _EOSModel(FakeModel):
    """Predicts the tokenizer's end-of-sequence token at every step."""

    def __init__(self, eos_id: int):
        super().__init__()
        self.eos_id = eos_id

    def __call__(self, idx, cache, input_lengths, last_only=True):
        logits = super().__call__(idx, cache, input_lengths, last_only)
        logits[:] = -10.0
        logits[..., self.eos_id] = 10.0
        return logits


def test_ignore_eos_generates_up_to_max_tokens():
    tok = byte_level_tokenizer()
    eos = tok.eos_token_id
    eng = Engine(_EOSModel(eos), tok, EngineConfig(max_slots=2)).start()
    try:
        prompt = tok.encode("hi")
        stopped = list(eng.submit(EngineRequest(prompt, SamplingParams(max_new_tokens=6))))
        assert [o.finish_reason for o in stopped] == ["stop"] and stopped[0].token_id == eos
        kept = list(eng.submit(EngineRequest(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))))
        assert [o.token_id for o in kept] == [eos] * 6 and kept[-1].finish_reason == "length"
    finally:
        eng.shutdown()
