"""Invariants of the model core: cache == no cache, batching, rollback, presets, configs."""

import pytest
import torch

from lmstack.errors import ConfigError, LMStackError
from lmstack.infer import SamplingParams, generate_ids
from lmstack.model import PRESETS, ModelConfig, Transformer, preset

TINY = ["tiny-gpt2", "tiny-llama", "tiny-mistral", "tiny-qwen2"]


def tiny(name, seed=0, **over):
    torch.manual_seed(seed)
    cfg = preset(name)
    for k, v in over.items():
        setattr(cfg, k, v)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("name", TINY)
def test_cached_decoding_equals_full_forward(name):
    m = tiny(name)
    ids = torch.randint(0, 320, (2, 40))  # > sliding window of tiny-mistral (16)
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 64)
        parts = [m(ids[:, :13], cache=cache)]
        for t in range(13, 40):
            parts.append(m(ids[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    assert cache.lengths == [40, 40]


@pytest.mark.parametrize("name", TINY)
def test_cached_and_uncached_greedy_tokens_identical(name):
    m = tiny(name)
    prompt = torch.randint(0, 320, (9,)).tolist()
    got = generate_ids(m, [prompt], SamplingParams(max_new_tokens=25))[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(25):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]


@pytest.mark.parametrize("name", TINY)
def test_batched_generation_equals_one_by_one(name):
    m = tiny(name)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (3, 11, 6, 1)]
    params = SamplingParams(max_new_tokens=15)
    batched = generate_ids(m, prompts, params)
    single = [generate_ids(m, [p], params)[0] for p in prompts]
    assert batched == single


def test_sampled_batch_equals_one_by_one_with_row_seeds():
    m = tiny("tiny-llama")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=123)
    batched = generate_ids(m, prompts, params)
    one = [generate_ids(m, [p], SamplingParams(**{**params.__dict__, "seed": 123 + i}))[0]
           for i, p in enumerate(prompts)]
    assert batched == one
    assert batched == generate_ids(m, prompts, params)  # same seed, same samples
    other = generate_ids(m, prompts, SamplingParams(**{**params.__dict__, "seed": 7}))
    assert other != batched


def test_rollback_then_redo_gives_same_logits():
    m = tiny("tiny-llama")
    ids = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        cache = m.new_cache(2, 32)
        m(ids[:, :12], cache=cache)
        first = m(ids[:, 12:16], cache=cache)
        cache.rollback(4)
        assert cache.lengths == [12, 12]
        m(torch.randint(0, 320, (2, 3)), cache=cache)  # a rejected draft
        cache.rollback([3, 3])
        again = m(ids[:, 12:16], cache=cache)
    torch.testing.assert_close(again, first, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        cache.rollback(100)


def test_per_row_lengths_and_padding():
    m = tiny("tiny-qwen2")
    a, b = torch.randint(0, 320, (1, 5)), torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        cache = m.new_cache(2, 32)
        padded = torch.zeros(2, 9, dtype=torch.long)
        padded[0, :5], padded[1] = a[0], b[0]
        last = m(padded, cache=cache, input_lengths=[5, 9], last_only=True)
        assert cache.lengths == [5, 9]
        torch.testing.assert_close(last[0, 0], m(a)[0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(last[1, 0], m(b)[0, -1], atol=1e-5, rtol=0)


def test_context_overflow_is_a_clear_error():
    m = tiny("tiny-llama")
    cache = m.new_cache(1, 8)
    with pytest.raises(LMStackError, match="context length exceeded"):
        m(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    assert cache.lengths == [0]  # a failed forward does not advance the cache


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("pos", ["rope", "learned", "sinusoidal", "none"])
def test_attention_and_position_switches(n_kv_head, pos):
    cfg = ModelConfig(vocab_size=64, block_size=32, n_layer=1, n_head=4, n_kv_head=n_kv_head, n_embd=32, pos=pos)
    m = Transformer(cfg).eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        out = m(ids)
        cache = m.new_cache(2, 16)
        inc = torch.cat([m(ids[:, :4], cache=cache), m(ids[:, 4:], cache=cache)], 1)
    assert out.shape == (2, 10, 64)
    torch.testing.assert_close(inc, out, atol=1e-5, rtol=0)
    assert m.num_params() == cfg.num_params()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_count_parameters(name):
    cfg = preset(name)
    with torch.device("meta"):
        m = Transformer(cfg)
    assert m.num_params() == cfg.num_params()


def test_known_preset_sizes():
    assert preset("smollm2-135m").num_params() == 134_515_008
    assert preset("gpt2-124m").num_params() == 124_439_808


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3, n_embd=32)
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("nope")
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({"n_layers": 2})
    with pytest.raises(ConfigError, match="expected an integer"):
        ModelConfig.from_dict({"n_layer": "two"})


def test_sampling_params_validation():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=1.0),
                dict(max_new_tokens=-1), dict(repetition_penalty=0), dict(stop=[""])):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)


def test_checkpoint_that_does_not_fit_the_config_is_named(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from lmstack.model.checkpoint import load_checkpoint, save_native

    save_native(Transformer(preset("tiny-llama")), tmp_path / "m")
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    cfg = json.loads((tmp_path / "m" / "lmstack.json").read_text())
    cfg["model"]["n_embd"] = 128  # the tensors are 64 wide
    (tmp_path / "m" / "lmstack.json").write_text(json.dumps(cfg))
    with pytest.raises(LMStackError, match=r"checkpoint tensor '[\w.]+' has shape \(\d+, 64\); the model's config "
                                           r"expects \(\d+, 128\)"):
        load_checkpoint(tmp_path / "m")
    cfg["model"]["n_embd"] = 64
    (tmp_path / "m" / "lmstack.json").write_text(json.dumps(cfg))
    sd["extra.weight"] = sd.pop("norm.weight")
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(LMStackError, match=r"missing \['norm.weight'\], unexpected \['extra.weight'\]"):
        load_checkpoint(tmp_path / "m")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_keep_returns_the_kept_positions_only(name):
    """``keep`` runs the last block's MLP on the marked positions only: the same hidden states
    (and logits) as the full forward at those positions, in row-major order."""
    model = tiny(name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 320, (3, 11), generator=g)
    keep = torch.rand(3, 11, generator=g) < 0.3
    keep[0, 0] = keep[2, -1] = True
    with torch.no_grad():
        full_h, part_h = model(ids, return_hidden=True), model(ids, return_hidden=True, keep=keep)
        full, part = model(ids), model(ids, keep=keep)
    assert part_h.shape == (1, int(keep.sum()), model.config.n_embd)
    torch.testing.assert_close(part_h[0], full_h[keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part[0], full[keep], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep"):
        model(ids, keep=keep[:, :-1])
