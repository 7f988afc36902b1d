"""GGUF loading: SmolLM2 parity with transformers' own GGUF loader, the cache, dequantisation."""

import math

import numpy as np
import pytest
import torch

from lmstack.errors import LMStackError, UnsupportedError
from lmstack.model.gguf_loader import unpermute_rope_rows

PARAGRAPH = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


def test_unpermute_inverts_llama_cpp_permutation():
    # llama.cpp's converter: reshape(n_head, 2, hd/2, ...).swapaxes(1, 2) (a forward transform we invert)
    n_head, hd, cols = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((n_head * hd, cols)).astype(np.float32)
    permuted = w.reshape(n_head, 2, hd // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(unpermute_rope_rows(permuted, n_head), w)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_dequantise_types_roundtrip(qtype):
    """Each type quantised by the gguf package comes back within that type's error bound."""
    from gguf import GGMLQuantizationType, quants

    t = GGMLQuantizationType[qtype]
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    try:
        q = quants.quantize(w, t)
    except NotImplementedError:
        pytest.skip(f"the gguf package cannot quantise {qtype} (it can dequantise it)")
    back = quants.dequantize(q, t)
    err = np.abs(back - w).max()
    bound = {"F32": 0, "F16": 2e-3, "BF16": 2e-2, "Q8_0": 0.03, "Q4_0": 0.5, "Q4_1": 0.5,
             "Q4_K": 0.5, "Q6_K": 0.1}[qtype]
    assert back.shape == w.shape and err <= bound


@pytest.mark.slow
def test_smollm2_logits_and_perplexity_match_transformers_gguf(smollm2_gguf, smollm2):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    ids = smollm2.tokenizer.encode(PARAGRAPH)
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    assert ids == ref_tok(PARAGRAPH, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(x).logits
    ours = smollm2.logits(x)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)

    def ppl(logits):
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])
        return math.exp(nll.item())

    assert ppl(ours) == pytest.approx(ppl(ref), rel=1e-3)


def test_smollm2_config_from_metadata(smollm2):
    cfg = smollm2.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta) == (1536, 49152, 100000.0)
    assert cfg.tie_embeddings and cfg.pos == "rope" and cfg.mlp == "swiglu"
    assert smollm2.model.num_params() == 134_515_008


def test_second_load_uses_the_cache(smollm2_gguf, smollm2, lmstack_cache, monkeypatch):
    """A cache hit never reads the GGUF's tensors: dequantising is made to fail, and the load
    still succeeds with the same logits (how fast it is, bench/load.py measures)."""
    from lmstack import LLM
    from lmstack.model import gguf_loader

    def no_dequantising(*a, **k):
        raise AssertionError("the second load dequantised the GGUF again instead of using the cache")

    monkeypatch.setattr(gguf_loader, "gguf_state_dict", no_dequantising)
    again = LLM.load(smollm2_gguf)
    assert list(lmstack_cache.glob("gguf/*/lmstack.json"))
    x = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(again.logits(x), smollm2.logits(x))


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt(smollm2_gguf, smollm2, lmstack_cache, monkeypatch, tmp_path):
    from lmstack.model import gguf_loader

    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path))
    # an unreadable cache entry (truncated weights) must not be trusted
    entry = tmp_path / "gguf" / f"{smollm2_gguf.stem}-{gguf_loader._file_key(smollm2_gguf)}"
    entry.mkdir(parents=True)
    (entry / "lmstack.json").write_text('{"format": "lmstack-native-v1", "model": {}}')
    (entry / "model.safetensors").write_bytes(b"\x00" * 10)
    model, tok, meta = gguf_loader.load_gguf(smollm2_gguf)
    assert meta["source_format"] == "gguf"
    x = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(x), smollm2.logits(x))


def test_bad_gguf_inputs(tmp_path):
    from lmstack import LLM

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(LMStackError, match="not a readable GGUF"):
        LLM.load(bad)
    with pytest.raises(LMStackError, match="model not found"):
        LLM.load(tmp_path / "missing.gguf")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x80\x04")
    with pytest.raises(UnsupportedError, match="unsupported model file"):
        LLM.load(other)


def _ref_q4_k(block: bytes) -> np.ndarray:
    """ggml's Q4_K block layout, transcribed independently: d, dmin (f16), 12 scale bytes, 128 qs."""
    d, dmin = np.frombuffer(block[:4], dtype=np.float16).astype(np.float32)
    sc, qs = block[4:16], block[16:144]

    def scale_min(j):
        if j < 4:
            return sc[j] & 63, sc[j + 4] & 63
        return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

    out = []
    for g in range(4):
        (s1, m1), (s2, m2) = scale_min(2 * g), scale_min(2 * g + 1)
        q = qs[32 * g : 32 * g + 32]
        out += [d * s1 * (b & 0xF) - dmin * m1 for b in q]
        out += [d * s2 * (b >> 4) - dmin * m2 for b in q]
    return np.array(out, dtype=np.float32)


def _ref_q6_k(block: bytes) -> np.ndarray:
    """ggml's Q6_K block: 128 low-nibble bytes, 64 high-bit bytes, 16 int8 scales, d (f16)."""
    ql, qh = block[:128], block[128:192]
    sc = np.frombuffer(block[192:208], dtype=np.int8).astype(np.float32)
    d = float(np.frombuffer(block[208:210], dtype=np.float16)[0])
    y = np.zeros(256, dtype=np.float32)
    for half in range(2):
        L, H, S, base = ql[64 * half :], qh[32 * half :], sc[8 * half :], 128 * half
        for l in range(32):
            i = l // 16
            q1 = ((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32
            q2 = ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32
            q3 = ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
            q4 = ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
            y[base + l] = d * S[i] * q1
            y[base + l + 32] = d * S[i + 2] * q2
            y[base + l + 64] = d * S[i + 4] * q3
            y[base + l + 96] = d * S[i + 6] * q4
    return y


@pytest.mark.parametrize("qtype,size,ref", [("Q4_K", 144, _ref_q4_k), ("Q6_K", 210, _ref_q6_k)])
def test_k_quant_dequantisation_matches_reference_layout(qtype, size, ref):
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(2)
    blocks = []
    for _ in range(3):
        b = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        scale = np.array([0.01, 0.002], dtype=np.float16).tobytes()
        if qtype == "Q4_K":
            b[0:4] = scale
        else:
            b[208:210] = scale[:2]
        blocks.append(bytes(b))
    raw = np.frombuffer(b"".join(blocks), dtype=np.uint8).reshape(1, -1)
    got = quants.dequantize(raw, GGMLQuantizationType[qtype]).reshape(-1)
    want = np.concatenate([ref(b) for b in blocks])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
