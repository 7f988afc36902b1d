"""The LLM entry point and the one generation loop, on tiny random models and on SmolLM2."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack import LLM
from lmstack.errors import LMStackError
from lmstack.infer import SamplingParams, stream_generate


@pytest.fixture(scope="module")
def tiny():
    return LLM.load("tiny-llama", seed=0)


def test_preset_load_and_shapes(tiny):
    assert tiny.tokenizer is not None and tiny.config.vocab_size == 320
    out = tiny.logits([[1, 2, 3], [4, 5, 6]])
    assert out.shape == (2, 3, 320) and out.dtype == torch.float32
    assert tiny.logits([7, 8]).shape == (1, 2, 320)
    with pytest.raises(LMStackError, match="ids must be in"):
        tiny.logits([[1, 999]])


@settings(max_examples=25, deadline=None)
@given(prompt=st.text(min_size=1, max_size=12), seed=st.integers(0, 2**16), temp=st.sampled_from([0.0, 0.8, 1.5]))
def test_stream_deltas_concatenate_to_the_full_text(tiny, prompt, seed, temp):
    kw = dict(max_new_tokens=12, temperature=temp, seed=seed)
    deltas = list(tiny.stream(prompt, **kw))
    full = tiny.generate(prompt, **kw)
    assert "".join(deltas) == full
    ids = [ev.token_id for ev in tiny.stream_events([prompt], **kw) if ev.token_id is not None]
    ids = [i for i in ids if i not in tiny.tokenizer.stop_token_ids]
    assert full == tiny.tokenizer.decode(ids)
    assert "\ufffd" not in "".join(deltas[:-1]) or "\ufffd" in full  # no broken char mid-stream


def test_seeded_sampling_is_reproducible(tiny):
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=42)
    assert tiny.generate("abc", **kw) == tiny.generate("abc", **kw)
    assert tiny.generate(["abc", "xyz"], **kw) == tiny.generate(["abc", "xyz"], **kw)


def test_batch_of_prompts_equals_one_by_one(tiny):
    prompts = ["a", "hello there", "xyz!"]
    assert tiny.generate(prompts, max_new_tokens=10) == [tiny.generate(p, max_new_tokens=10) for p in prompts]


def test_stop_tokens_strings_and_max_tokens(tiny):
    events = list(tiny.stream_events(["hello"], max_new_tokens=7, ignore_eos=True))
    assert len(events) == 7 and events[-1].finish_reason == "length"
    full = tiny.generate("hello", max_new_tokens=30, ignore_eos=True)
    if len(full) >= 4:
        stop = full[2:4]
        cut = tiny.generate("hello", max_new_tokens=30, ignore_eos=True, stop=[stop])
        assert cut == full[: full.index(stop)]
    # a token id given as stop token ends generation at its first occurrence
    ids = [ev.token_id for ev in tiny.stream_events(["hello"], max_new_tokens=10, ignore_eos=True)]
    evs = list(tiny.stream_events(["hello"], max_new_tokens=10, ignore_eos=True, stop_token_ids=[ids[3]]))
    assert evs[-1].finish_reason == "stop" and len(evs) == ids.index(ids[3]) + 1


def test_logprobs_are_log_softmax_of_the_logits(tiny):
    evs = list(tiny.stream_events(["hi"], max_new_tokens=3, logprobs=True))
    ids = tiny.tokenizer.encode("hi")
    logits = tiny.logits([ids])[0, -1, : len(tiny.tokenizer)]  # ids the tokenizer cannot decode are excluded
    assert evs[0].logprob == pytest.approx(torch.log_softmax(logits, -1)[evs[0].token_id].item(), abs=1e-5)


def test_repetition_penalty_changes_greedy_output():
    llm = LLM.load("tiny-qwen2", seed=3)
    plain = llm.generate("aaaa", max_new_tokens=24, ignore_eos=True)
    penal = llm.generate("aaaa", max_new_tokens=24, ignore_eos=True, repetition_penalty=5.0)
    assert plain != penal


def test_bad_prompts_and_params(tiny):
    with pytest.raises(LMStackError, match="empty prompt"):
        list(stream_generate(tiny.model, tiny.tokenizer, [[]], SamplingParams()))
    with pytest.raises(LMStackError, match="no room"):
        list(stream_generate(tiny.model, tiny.tokenizer, [[1] * 200], SamplingParams()))
    with pytest.raises(LMStackError, match="temperature"):
        tiny.generate("x", temperature=-1)


def test_native_and_hf_round_trip(tiny, tmp_path):
    tiny.save(tmp_path / "native")
    back = LLM.load(tmp_path / "native")
    assert back.metadata["source"] == "preset:tiny-llama"
    ids = [[5, 6, 7, 8]]
    assert torch.equal(back.logits(ids), tiny.logits(ids))
    assert back.generate("hey", max_new_tokens=8) == tiny.generate("hey", max_new_tokens=8)
    tiny.save(tmp_path / "hf", format="hf")
    hf_back = LLM.load(tmp_path / "hf")
    assert torch.equal(hf_back.logits(ids), tiny.logits(ids))
    assert hf_back.tokenizer.encode("héllo") == tiny.tokenizer.encode("héllo")


def test_bf16_model_matches_fp32_within_bf16_rounding():
    fp32 = LLM.load("tiny-llama", seed=0)
    llm = LLM.load("tiny-llama", dtype="bfloat16", seed=0)  # the same init, rounded to bf16
    assert llm.model.output_weight.dtype == torch.bfloat16
    torch.manual_seed(0)
    ids = torch.randint(0, 320, (2, 24)).tolist()
    ref, got = fp32.logits(ids), llm.logits(ids).float()
    # bf16 keeps 8 significant bits (unit roundoff 2^-8): a few roundings of the largest logit
    # bound the error (observed: 4.6e-3 of max |logit| 1.43, a relative norm of 4.8e-3)
    torch.testing.assert_close(got, ref, rtol=0, atol=4 * 2**-8 * float(ref.abs().max()))
    assert float((got - ref).norm() / ref.norm()) < 2e-2
    assert got.argmax(-1).tolist() == ref.argmax(-1).tolist()
    assert isinstance(llm.generate("hi", max_new_tokens=5), str)
    with pytest.raises(LMStackError, match="float16 is very slow"):
        LLM.load("tiny-llama", dtype="float16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_info_reports_shape_dtype_and_sizes_without_dequantising(monkeypatch, dtype):
    from lmstack.peft import PEFTConfig, apply_peft
    from lmstack.quant import QuantEmbedding

    llm = LLM.load("tiny-llama", dtype=dtype)
    cfg, size = llm.config, 4 if dtype == "float32" else 2
    info = llm.info()
    assert info["dtype"] == dtype and info["params"] == llm.model.num_params()
    assert info["weight_bytes"] == info["params"] * size  # tied table counted once
    assert info["kv_bytes_per_token"] == 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * size
    if dtype == "float32":  # a QLoRA model: its dtype is the compute dtype, its quantised table is not expanded
        apply_peft(llm.model, PEFTConfig(method="qlora", r=4, alpha=8, group_size=32))
        assert isinstance(llm.model.tok_emb, QuantEmbedding)
        monkeypatch.setattr(QuantEmbedding, "rows", lambda *a, **k: pytest.fail("info() dequantised the table"))
        assert llm.info()["dtype"] == "float32"


def test_smollm2_answers_the_capital_of_france(smollm2):
    answer = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=30)
    assert "Paris" in answer


def test_smollm2_beam_search_best_first(smollm2):
    hyps = smollm2.beam_search("The capital of France is", num_beams=3, max_new_tokens=6)
    assert len(hyps) == 3 and hyps[0][1] >= hyps[1][1] >= hyps[2][1]
    assert "Paris" in hyps[0][0]
