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
    """Counts calls into the compiled kernel, per dtype."""
    seen = {torch.float32: 0, torch.bfloat16: 0}
    for dt, fn in list(cpu_kernels._FN.items()):
        def counted(*a, _fn=fn, _dt=dt):
            seen[_dt] += 1
            return _fn(*a)
        monkeypatch.setitem(cpu_kernels._FN, dt, counted)
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
    assert calls[torch.float32] == 1


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
    assert calls[torch.bfloat16] == 1


def test_gradients_and_large_batches_use_torch(calls):
    w = torch.nn.Parameter(torch.randn(8, 16))
    x = torch.randn(1, 16)
    y = cpu_kernels.linear(x, w)
    y.sum().backward()  # autograd never goes through the kernel
    assert w.grad is not None and calls[torch.float32] == 0
    with torch.no_grad():
        big = torch.randn(cpu_kernels.MAX_ROWS + 1, 16)
        assert torch.equal(cpu_kernels.linear(big, w), F.linear(big, w))
        assert calls[torch.float32] == 0
        cpu_kernels.linear(x, w)
        assert calls[torch.float32] == 1


def test_other_dtypes_and_mixed_inputs_use_torch(calls):
    w = torch.randn(8, 16, dtype=torch.float64)
    x = torch.randn(1, 16, dtype=torch.float64)
    assert torch.equal(cpu_kernels.linear(x, w), F.linear(x, w))
    w32 = torch.randn(8, 16)
    y = cpu_kernels.linear(torch.randn(1, 16).bfloat16(), w32.bfloat16().t().contiguous().t()[:, :16])
    assert y.dtype == torch.bfloat16
    assert calls == {torch.float32: 0, torch.bfloat16: 0}  # a non-contiguous weight falls back


def test_linear_module_keeps_nn_linear_keys_and_results():
    m = cpu_kernels.Linear(16, 8)
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
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == "True", out.stderr
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # one library, no leftover temp dirs
