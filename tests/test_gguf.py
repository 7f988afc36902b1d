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


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantise_types_roundtrip(qtype):
    """Each type quantised by the gguf package comes back within that type's error bound (the
    K-quants, which it cannot quantise, are checked against their block layout below)."""
    from gguf import GGMLQuantizationType, quants

    t = GGMLQuantizationType[qtype]
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    q = quants.quantize(w, t)
    back = quants.dequantize(q, t)
    err = np.abs(back - w).max()
    bound = {"F32": 0, "F16": 2e-3, "BF16": 2e-2, "Q8_0": 0.03, "Q4_0": 0.5, "Q4_1": 0.5}[qtype]
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


# -- GGUF files written with gguf.GGUFWriter, read back through lmstack's loader ---------------

# Every type the gguf package can quantise. Max error as a fraction of the tensor's largest
# magnitude: half a quantisation step (Q8_0: 1/254; Q5_1: 1/31 and Q4_1: 1/15 of the range,
# at most twice the magnitude), a whole step for Q5_0 (1/16) and Q4_0 (1/8), whose scale maps
# the block's extreme to -16 / -8 so the opposite sign clamps at 15 / 7; MXFP4's largest E2M1
# step, 2 of 6, under the block's power-of-two scale; a margin for the fp16 block scales.
# TQ1_0 / TQ2_0 are ternary (BitNet): they get ternary weights, which they store exactly.
WRITABLE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 6e-3, "Q5_0": 0.07, "Q5_1": 0.04, "Q4_0": 0.135,
            "Q4_1": 0.075, "MXFP4": 0.26, "TQ1_0": 1e-6, "TQ2_0": 1e-6}
TERNARY = {"TQ1_0", "TQ2_0"}
# What the gguf package cannot write (NotImplementedError from gguf.quants.quantize): the K- and
# I-quants and NVFP4 need llama.cpp's C quantisers (the I-quants an importance matrix too);
# Q8_1 / Q8_K are llama.cpp's formats for activations in dot products, never stored weights.
# lmstack reads the K-quants through gguf.quants.dequantize: Q4_K and Q6_K are checked below
# against an independent transcription of their block layout.
NOT_WRITABLE = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S",
                "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "NVFP4", "Q8_1", "Q8_K"]


def _byte_tokens() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return ["<|endoftext|>", "<|im_end|>"] + [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _source_model(arch: str, ternary: bool = False):
    """A random one-layer model whose rows are 256 wide, so every block size (32, 256) fits."""
    from dataclasses import replace

    from lmstack.model import Transformer, preset

    cfg = replace(preset("tiny-gpt2" if arch == "gpt2" else f"tiny-{arch}"), vocab_size=258, n_layer=1,
                  n_embd=256, head_dim=64, intermediate_size=512, block_size=64)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if ternary and p.dim() == 2:  # {-s, 0, s} with s = 2^-6, exact in fp16
                p.copy_(torch.randint(-1, 2, p.shape, generator=g).float() * 2.0 ** -6)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names and layout (fp32)."""
    cfg, sd = model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()}
    top = {"tok_emb.weight": "token_embd.weight", "pos_emb.weight": "position_embd.weight",
           "norm.weight": "output_norm.weight", "norm.bias": "output_norm.bias", "lm_head.weight": "output.weight"}
    layer = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
             "attn.v_proj": "attn_v"}
    out = {}
    for key, w in sd.items():
        if key in top:
            out[top[key]] = w
            continue
        _, i, rest = key.split(".", 2)
        name, kind = rest.rsplit(".", 1)
        if cfg.arch == "gpt2" and name in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
            if name == "attn.q_proj":  # fused rows [q; k; v]
                out[f"blk.{i}.attn_qkv.{kind}"] = np.concatenate(
                    [sd[f"blocks.{i}.attn.{p}_proj.{kind}"] for p in "qkv"])
            continue
        if cfg.arch == "llama" and name in ("attn.q_proj", "attn.k_proj"):  # llama.cpp's rotary row order
            heads = cfg.n_head if name == "attn.q_proj" else cfg.n_kv_head
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        out[f"blk.{i}.{layer[name]}.{kind}"] = w
    return out


def _write_gguf(path, model, qtype: str, raw: dict | None = None) -> None:
    """Write ``model`` with every matrix stored as ``qtype`` (vectors stay F32, as llama.cpp
    keeps them); ``raw`` maps tensor names to (bytes as uint8 rows, type) written as they are."""
    import gguf
    from gguf import GGMLQuantizationType, quants

    cfg, arch = model.config, model.config.arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(_byte_tokens())
    w.add_token_types([3, 3] + [1] * 256)
    w.add_token_merges([])
    w.add_eos_token_id(0)
    t = GGMLQuantizationType[qtype]
    for name, a in _gguf_tensors(model).items():
        if raw and name in raw:
            data, rt = raw[name]
            w.add_tensor(name, data, raw_dtype=rt)
        elif a.ndim == 2 and t != GGMLQuantizationType.F32:
            q = quants.quantize(a, t)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=t)
        else:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _same_config(a, b) -> bool:
    """Equal configs; GGUF stores the norm epsilon as float32, so that one compares as float32."""
    from dataclasses import replace

    return replace(a, norm_eps=b.norm_eps) == b and np.float32(a.norm_eps) == np.float32(b.norm_eps)


def test_every_ggml_type_is_accounted_for():
    """Each GGML type is either written and loaded below, or named as not writable with a reason."""
    from gguf import GGMLQuantizationType, quants

    w = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    for t in GGMLQuantizationType:
        try:
            quants.quantize(w, t)
            writable = True
        except NotImplementedError:
            writable = False
        assert writable == (t.name in WRITABLE), t.name
    floats_and_ints = {"I8", "I16", "I32", "I64", "F64", "Q1_0"}  # not weight formats lmstack reads
    assert {t.name for t in GGMLQuantizationType} == set(WRITABLE) | set(NOT_WRITABLE) | floats_and_ints


@pytest.mark.parametrize("qtype", list(WRITABLE))
def test_writer_files_load_through_lmstack_for_every_type(tmp_path, qtype):
    """A llama GGUF of ``qtype`` written by gguf.GGUFWriter, read by lmstack's loader: every
    weight within the type's error of the source, and so are the logits."""
    from gguf import GGMLQuantizationType, quants

    from lmstack.model.gguf_loader import load_gguf

    src = _source_model("llama", ternary=qtype in TERNARY)
    _write_gguf(tmp_path / "m.gguf", src, qtype)
    model, tok, _ = load_gguf(tmp_path / "m.gguf", use_cache=False)
    assert _same_config(model.config, src.config) and len(tok) == 258
    want, got = src.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    for k, w in want.items():
        err = (got[k] - w).abs().max().item()
        assert err <= WRITABLE[qtype] * w.abs().max().item() + 1e-12, f"{qtype} {k}: max error {err:.3g}"
        if w.dim() == 2:  # exactly the type's own rounding: the loader adds no error (blocks run along rows)
            t = GGMLQuantizationType[qtype]
            assert torch.equal(got[k], torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), t), t))), k
            assert err > 0 or qtype == "F32" or qtype in TERNARY  # really stored as qtype, not as floats
    ids = torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(ids), src(ids)
    # one layer: the logits' error stays within twice the weights' (measured: 0 for F32 and the
    # ternary types, 3.2e-4 F16, 7.6e-3 Q8_0, 0.13 Q4_0, 0.18 MXFP4 of the largest logit)
    assert ((a - b).abs().max() / b.abs().max()).item() <= 2 * WRITABLE[qtype]


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_writer_files_of_other_architectures(tmp_path, arch):
    """GPT-2 (fused qkv, learned positions, biases) and Qwen2 (qkv biases, no row permutation) in Q8_0."""
    from lmstack.model.gguf_loader import load_gguf

    src = _source_model(arch)
    _write_gguf(tmp_path / "m.gguf", src, "Q8_0")
    model, _, _ = load_gguf(tmp_path / "m.gguf", use_cache=False)
    assert _same_config(model.config, src.config)
    for k, w in src.state_dict().items():
        assert (model.state_dict()[k] - w).abs().max() <= WRITABLE["Q8_0"] * w.abs().max(), k
    ids = torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(ids), src(ids)
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-2


@pytest.mark.parametrize("qtype,size,ref", [("Q4_K", 144, _ref_q4_k), ("Q6_K", 210, _ref_q6_k)])
def test_k_quant_tensors_in_a_file_load_as_their_block_layout(tmp_path, qtype, size, ref):
    """K-quant blocks (which the gguf package cannot write from floats) stored as raw bytes in a
    GGUF file: lmstack's loader gives the values of the independently transcribed layout."""
    from gguf import GGMLQuantizationType

    from lmstack.model.gguf_loader import load_gguf

    src = _source_model("llama")
    rng = np.random.default_rng(4)
    rows = src.config.intermediate_size  # ffn_up: (512, 256), one 256-wide block per row
    blocks = bytearray(rng.integers(0, 256, rows * size, dtype=np.uint8).tobytes())
    for r in range(rows):  # small finite fp16 scales
        at = r * size + (0 if qtype == "Q4_K" else 208)
        blocks[at:at + (4 if qtype == "Q4_K" else 2)] = np.array([0.01, 0.002][:2 if qtype == "Q4_K" else 1],
                                                                 dtype=np.float16).tobytes()
    data = np.frombuffer(bytes(blocks), dtype=np.uint8).reshape(rows, size)
    _write_gguf(tmp_path / "k.gguf", src, "F32", raw={"blk.0.ffn_up.weight": (data, GGMLQuantizationType[qtype])})
    model, _, _ = load_gguf(tmp_path / "k.gguf", use_cache=False)
    want = np.stack([ref(bytes(data[r])) for r in range(rows)])
    np.testing.assert_allclose(model.state_dict()["blocks.0.mlp.up_proj.weight"].numpy(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.state_dict()["blocks.0.mlp.down_proj.weight"],
                               src.state_dict()["blocks.0.mlp.down_proj.weight"], rtol=0, atol=0)
