"""The small-batch CPU linear kernel: same results as F.linear, and used only where it applies."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lmstack.model import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the kernel cannot be built here")


@pytest.fixture
def calls(monkeypatch):
    """Counts calls into the compiled kernels, by entry point and dtype."""
    seen = {}
    for name, fn in list(cpu_kernels._FN.items()):
        def counted(bf16, *a, _fn=fn, _name=name):
            key = (_name, torch.bfloat16 if bf16 else torch.float32)
            seen[key] = seen.get(key, 0) + 1
            return _fn(bf16, *a)
        monkeypatch.setitem(cpu_kernels._FN, name, counted)
    return seen


@pytest.mark.parametrize("N,K", [(64, 64), (100, 37), (7, 576), (300, 1536), (33, 130), (5, 16)])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_matches_f_linear(calls, N, K, M, bias):
    g = torch.Generator().manual_seed(N * 1000 + K + M)
    w, x = torch.randn(N, K, generator=g), torch.randn(2, M, K, generator=g)[:1]
    b = torch.randn(N, generator=g) if bias else None
    y = cpu_kernels.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == (1, M, N) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * K ** 0.5)
    assert calls == {("linear", torch.float32): 1}


@pytest.mark.parametrize("N,K", [(64, 64), (100, 37), (300, 1536), (33, 130)])
@pytest.mark.parametrize("M", [1, 5])
def test_bf16_within_rounding_of_f_linear(calls, N, K, M):
    g = torch.Generator().manual_seed(N + K + M)
    w = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(M, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    y = cpu_kernels.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double())  # exact sums of the bf16 inputs
    assert y.dtype == torch.bfloat16
    # One bf16 rounding of the output (2^-8 relative) plus fp32 summation error.
    torch.testing.assert_close(y.double(), ref, rtol=2 ** -8, atol=1e-3)
    assert calls == {("linear", torch.bfloat16): 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 4])
def test_group_equals_separate_linears(calls, dtype, M):
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 1, 96, generator=g).to(dtype)
    ws = [torch.randn(n, 96, generator=g).to(dtype) for n in (96, 32, 32)]
    bs = [torch.randn(96, generator=g).to(dtype), None, torch.randn(32, generator=g).to(dtype)]
    outs = cpu_kernels.linear_group(x, ws, bs)
    assert calls == {("group", dtype): 1}
    for y, w, b in zip(outs, ws, bs):
        assert y.shape == (M, 1, w.shape[0]) and y.dtype == dtype
        assert torch.equal(y, cpu_kernels.linear(x, w, b))  # same sums, same rounding as one matrix at a time


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_swiglu_matches_torch(calls, dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g).to(dtype)
    wg, wu = (torch.randn(200, 64, generator=g).mul(0.2).to(dtype) for _ in range(2))
    y = cpu_kernels.swiglu(x, wg, wu)
    ref = F.silu(F.linear(x, wg)) * F.linear(x, wu)
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)
    assert calls == {("group", dtype): 1}
    assert cpu_kernels.swiglu(x, wg, wu[:100]) is None  # shapes that do not pair up: the caller's torch path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_reference_formula(calls, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 576, generator=g).mul(3).to(dtype)
    w = torch.rand(576, generator=g).add(0.5).to(dtype)
    y = cpu_kernels.rms_norm(x, w, 1e-5)
    xf = x.float()
    ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)  # as HF Llama does
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)
    assert calls == {("rmsnorm", dtype): 1}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("prompts,kernels", [
    # rows of equal length: every kernel, attention included
    ([[5, 6, 7, 8], [9, 10, 11, 12]], {"linear", "group", "rmsnorm", "rope", "attention"}),
    # ragged rows need a key mask: attention stays with torch
    ([[5, 6, 7, 8], [9, 10]], {"linear", "group", "rmsnorm", "rope"}),
])
def test_model_decodes_the_same_tokens_with_and_without_kernels(monkeypatch, calls, dtype, prompts, kernels):
    from lmstack import LLM
    from lmstack.infer import SamplingParams, generate_ids

    llm = LLM.load("tiny-llama", dtype=dtype)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    with_kernels = generate_ids(llm.model, prompts, params)
    assert {name for name, _ in calls} == kernels
    monkeypatch.setattr(cpu_kernels, "_lib", False)  # switched off: every call takes torch's path
    assert generate_ids(llm.model, prompts, params) == with_kernels


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("G,R", [(3, 3), (2, 1)])
def test_decode_attention_matches_sdpa_on_cache_views(calls, dtype, tol, G, R):
    g = torch.Generator().manual_seed(G * 10 + R)
    kc, vc = (torch.randn(2, G, 50, 16, generator=g).to(dtype) for _ in range(2))  # cache buffers
    k, v = kc[:, :, :37], vc[:, :, :37]  # the visible keys: strided views
    q = torch.randn(2, G, R, 16, generator=g).to(dtype)
    y = cpu_kernels.decode_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    assert calls == {("attention", dtype): 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_equals_the_model_formula(calls, dtype):
    from lmstack.model.model import apply_rope, rope_tables

    cos, sin = rope_tables(32, 64, 10000.0)
    pos = torch.tensor([[7], [40]])
    c, s = cos[pos][:, None].to(dtype), sin[pos][:, None].to(dtype)  # (B, 1, 1, D), as the model gathers them
    q = torch.randn(2, 9, 1, 32).to(dtype)
    k = torch.randn(2, 3, 1, 32).to(dtype)
    want_q, want_k = apply_rope(q, c, s), apply_rope(k, c, s)
    assert cpu_kernels.rope_(c, s, q, k)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)  # same roundings as torch's ops
    assert calls == {("rope", dtype): 2}
    bad = torch.randn(2, 3, 2, 32).to(dtype)  # two positions per row: not a decode step
    before = q.clone()
    assert not cpu_kernels.rope_(c, s, q, bad) and torch.equal(q, before)  # all or nothing


def test_gradients_and_large_batches_use_torch(calls):
    w = torch.nn.Parameter(torch.randn(8, 16))
    x = torch.randn(1, 16)
    y = cpu_kernels.linear(x, w)
    y.sum().backward()  # autograd never goes through the kernel
    assert w.grad is not None and calls == {}
    with torch.no_grad():
        big = torch.randn(cpu_kernels.MAX_ROWS + 1, 16)
        assert torch.equal(cpu_kernels.linear(big, w), F.linear(big, w))
        assert calls == {}
        cpu_kernels.linear(x, w)
        assert calls == {("linear", torch.float32): 1}


def test_other_dtypes_and_mixed_inputs_use_torch(calls):
    w = torch.randn(8, 16, dtype=torch.float64)
    x = torch.randn(1, 16, dtype=torch.float64)
    assert torch.equal(cpu_kernels.linear(x, w), F.linear(x, w))
    w32 = torch.randn(8, 16)
    y = cpu_kernels.linear(torch.randn(1, 16).bfloat16(), w32.bfloat16().t().contiguous().t()[:, :16])
    assert y.dtype == torch.bfloat16
    assert calls == {}  # a non-contiguous weight falls back


def test_linear_module_keeps_nn_linear_keys_and_results():
    from lmstack.model.fast import FastLinear

    m = FastLinear(16, 8)
    assert isinstance(m, torch.nn.Linear) and set(m.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 1, 16)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), rtol=1e-5, atol=1e-6)


def test_switched_off_by_environment(tmp_path):
    code = ("from lmstack.model import cpu_kernels as c; import torch; "
            "print(c.available(), torch.equal(c.linear(torch.ones(1, 4), torch.ones(2, 4)), torch.full((1, 2), 4.0)))")
    env = {**os.environ, "LMSTACK_CPU_KERNELS": "0", "LMSTACK_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "True"]
    assert not (tmp_path / "kernels").exists()


def test_builds_into_an_empty_cache_and_reuses_it(tmp_path):
    code = "from lmstack.model import cpu_kernels as c; print(c.available())"
    env = {**os.environ, "LMSTACK_CACHE": str(tmp_path)}
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "small_linear-0123456789abcdef.so").write_bytes(b"an older build")
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == "True", out.stderr
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # one library: no older build, no temp dirs


@pytest.mark.parametrize("N,K,G", [(96, 128, 32), (50, 256, 64), (300, 576, 64), (7, 192, 96), (40, 1536, 128)])
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_matches_the_dequantised_weight(calls, N, K, G, M, bias):
    from lmstack.quant import dequantize, quantize_int4

    g = torch.Generator().manual_seed(N * 1000 + K + M)
    q, s = quantize_int4(torch.randn(N, K, generator=g), G)
    x = torch.randn(3, M, K, generator=g)[1:2]
    b = torch.randn(N, generator=g) if bias else None
    y = cpu_kernels.int4_linear(x, q, s, b, G)
    ref = F.linear(x.double(), dequantize(q, s, "int4", G).double(), None if b is None else b.double())
    assert y.shape == (1, M, N) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * K ** 0.5)
    assert calls == {("int4", torch.float32): 1}


def test_int4_leaves_what_it_does_not_take_to_torch(calls):
    from lmstack.quant import quantize_int4

    q, s = quantize_int4(torch.randn(8, 64), 32)
    x = torch.randn(2, 64)
    assert cpu_kernels.int4_linear(x.requires_grad_(), q, s, None, 32) is None  # autograd needs torch's ops
    x = x.detach()
    assert cpu_kernels.int4_linear(torch.randn(cpu_kernels.MAX_ROWS + 1, 64), q, s, None, 32) is None
    assert cpu_kernels.int4_linear(x.bfloat16(), q, s, None, 32) is None
    q16, s16 = quantize_int4(torch.randn(8, 64), 16)
    assert cpu_kernels.int4_linear(x, q16, s16, None, 16) is None  # groups must be a multiple of 32
    assert calls == {}


def test_qlora_model_decodes_the_same_tokens_with_and_without_the_int4_kernel(monkeypatch, calls):
    from lmstack.infer import SamplingParams, generate_ids
    from lmstack.model import Transformer, preset
    from lmstack.peft import PEFTConfig, apply_peft

    torch.manual_seed(0)
    model = apply_peft(Transformer(preset("tiny-llama")), PEFTConfig(method="qlora", r=4, alpha=8, group_size=32))
    for m in model.modules():  # adapters that change the output
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 2, 44], [7, 7]]
    with_kernel = generate_ids(model.eval(), prompts, params)
    # every quantised linear (7 per layer) and the tied output projection, at every decode step
    assert calls[("int4", torch.float32)] >= (7 * 2 + 1) * 11
    monkeypatch.setattr(cpu_kernels, "_lib", False)
    assert generate_ids(model, prompts, params) == with_kernel


def test_loading_swaps_in_the_kernel_modules_and_keeps_the_keys(tmp_path, monkeypatch):
    from lmstack import LLM
    from lmstack.model import Transformer, fast, preset
    from lmstack.model.checkpoint import load_checkpoint, save_native

    plain_keys = list(Transformer(preset("tiny-llama")).state_dict())
    llm = LLM.load("tiny-llama")
    save_native(llm.model, tmp_path / "m")
    loaded, _, _ = load_checkpoint(tmp_path / "m")
    for model in (llm.model, loaded):
        block = model.blocks[0]
        assert type(block.attn) is fast.FastAttention and type(block.mlp) is fast.FastMLP
        assert type(block.attn_norm) is fast.FastRMSNorm and type(model.norm) is fast.FastRMSNorm
        assert all(type(getattr(block.attn, f"{p}_proj")) is fast.FastLinear for p in "qkvo")
        assert type(model.tok_emb) is fast.FastEmbedding
        assert list(model.state_dict()) == plain_keys
    fast.uninstall(loaded)
    assert type(loaded.blocks[0].attn).__name__ == "Attention" and type(loaded.tok_emb) is torch.nn.Embedding
    assert list(loaded.state_dict()) == plain_keys
    monkeypatch.setattr(cpu_kernels, "_lib", False)  # no kernel: nothing is swapped
    again, _, _ = load_checkpoint(tmp_path / "m")
    assert not any(type(m).__module__ == fast.__name__ for m in again.modules())


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-mistral", "tiny-qwen2"])
def test_swapped_modules_decode_the_same_tokens_as_the_reference(calls, name):
    import copy

    from lmstack.infer import SamplingParams, generate_ids
    from lmstack.model import Transformer, fast, preset

    torch.manual_seed(0)
    plain = Transformer(preset(name)).eval()
    swapped = fast.install(copy.deepcopy(plain))
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16], [3, 4]]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    reference = generate_ids(plain, prompts, params)
    assert calls == {}  # the reference never calls a kernel
    assert generate_ids(swapped, prompts, params) == reference
    assert ("linear", torch.float32) in calls and ("group", torch.float32) in calls


@pytest.mark.parametrize("method", ["lora", "qlora", "prefix", "adapter"])
def test_peft_swaps_compose_with_the_kernel_modules(method):
    import copy

    from lmstack import LLM
    from lmstack.infer import SamplingParams, generate_ids
    from lmstack.model import fast
    from lmstack.peft import PEFTConfig, apply_peft, peft_state_dict

    llm = LLM.load("tiny-llama")
    plain = fast.uninstall(copy.deepcopy(llm.model))
    cfg = PEFTConfig(method=method, r=4, alpha=8, group_size=32, n_prefix=4, adapter_size=8)
    models = [apply_peft(m, cfg).eval() for m in (llm.model, plain)]
    for m in models:
        torch.manual_seed(1)
        for p in peft_state_dict(m).values():  # adapters that change the output
            p.data.normal_(std=0.05)
    assert list(models[0].state_dict()) == list(models[1].state_dict())
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 2, 44], [7, 7]]
    assert generate_ids(models[0], prompts, params) == generate_ids(models[1], prompts, params)


def test_a_merged_lora_model_keeps_the_kernels_its_base_had():
    import copy

    from lmstack import LLM
    from lmstack.model import fast
    from lmstack.peft import PEFTConfig, apply_peft
    from lmstack.peft.core import merge_and_unload

    llm = LLM.load("tiny-llama")
    plain = fast.uninstall(copy.deepcopy(llm.model))
    swapped = merge_and_unload(apply_peft(llm.model, PEFTConfig(method="lora", r=4, alpha=8)))
    assert all(type(getattr(swapped.blocks[0].attn, f"{p}_proj")) is fast.FastLinear for p in "qkvo")
    unswapped = merge_and_unload(apply_peft(plain, PEFTConfig(method="lora", r=4, alpha=8)))
    assert not fast.installed(unswapped)  # a reference model stays the reference
