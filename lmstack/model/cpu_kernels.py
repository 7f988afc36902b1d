"""A memory-bound CPU kernel for linear layers with only a few input rows (decoding).

At decode time each step multiplies one row per sequence by every weight matrix, so the step
time is the time to stream the weights from memory. torch's CPU GEMV reaches about a quarter
of the bandwidth a plain reduction gets on the same cores (see docs/benchmarks.md), so
``linear`` sends inference-time calls with at most ``MAX_ROWS`` rows to a small C kernel
(``kernels/small_linear.c``) and everything else to ``F.linear``.

The kernel is compiled on first use with the system C compiler (``$CC``, else ``cc``) and
cached under ``$LMSTACK_CACHE/kernels``, keyed by the source, the compiler, the flags and the
CPU; it is loaded with ctypes, so no torch headers or build tools beyond a C compiler are
needed. Without a compiler, or with ``LMSTACK_CPU_KERNELS=0``, ``linear`` is ``F.linear``.
Autograd never goes through the kernel: a call that needs gradients uses ``F.linear``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_ROWS = 16
_SOURCE = Path(__file__).with_name("kernels") / "small_linear.c"
_lib = None  # ctypes.CDLL once loaded, False once it failed or is switched off
_FN = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("LMSTACK_CACHE", Path.home() / ".cache" / "lmstack")) / "kernels"


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(cc: str, out: Path) -> None:
    base = [cc, "-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]
    errors = []
    for flags in (["-fopenmp"], []):  # OpenMP where the compiler has it, else one thread
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_so = Path(tmp) / out.name
            r = subprocess.run(base + flags + [str(_SOURCE), "-o", str(tmp_so)], capture_output=True, text=True)
            if r.returncode == 0:
                os.replace(tmp_so, out)  # atomic: a concurrent process sees the old file or the new one
                return
            errors.append(r.stderr.strip()[-500:])
    raise RuntimeError("; ".join(errors))


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel library, building it on first use; ``None`` when unavailable."""
    global _lib
    if _lib is not None:
        return _lib or None
    _lib = False
    if os.environ.get("LMSTACK_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler found; CPU decode uses torch's linear")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(b"\0".join(
            s.encode() for s in (_SOURCE.read_text(), cc, version, _cpu_signature(), platform.machine())
        )).hexdigest()[:16]
        d = _cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        so = d / f"small_linear-{key}.so"
        if not so.exists():
            _compile(cc, so)
        lib = ctypes.CDLL(str(so))
        for name, ptr in (("lm_small_linear_f32", ctypes.c_void_p), ("lm_small_linear_bf16", ctypes.c_void_p)):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            fn.argtypes = [ptr, ptr, ptr, ptr, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        _FN[torch.float32] = lib.lm_small_linear_f32
        _FN[torch.bfloat16] = lib.lm_small_linear_bf16
    except Exception as e:  # never fatal: the torch path is always there
        log.warning("CPU decode kernel unavailable (%s); using torch's linear", str(e)[:300])
        return None
    _lib = lib
    return lib


def available() -> bool:
    return load() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the small-batch kernel where it applies: CPU,
    fp32 or bf16, no gradient needed, at most ``MAX_ROWS`` rows of ``x``.

    Called ~200 times per decoded token, so the checks are ordered cheapest-first and the
    common case (contiguous ``x``) avoids any reshape."""
    fn = _FN.get(weight.dtype) if _lib else None
    if fn is None:
        if _lib is None and load() is not None:
            return linear(x, weight, bias)
        return F.linear(x, weight, bias)
    K = weight.shape[-1]
    n = x.numel()
    if (
        n > MAX_ROWS * K
        or n == 0
        or x.dtype != weight.dtype
        or x.shape[-1] != K
        or weight.dim() != 2
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad
                                         or (bias is not None and bias.requires_grad)))
        or (type(weight) is not torch.nn.Parameter and type(weight) is not torch.Tensor)
        or not weight.is_contiguous()
        or (bias is not None and (bias.dtype != weight.dtype or not bias.is_contiguous()))
        or torch.compiler.is_compiling()
    ):
        return F.linear(x, weight, bias)
    if not x.is_contiguous():
        x = x.contiguous()
    N = weight.shape[0]
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype)
    rc = fn(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
            n // K, N, K, torch.get_num_threads())
    if rc != 0:
        return F.linear(x, weight, bias)
    return y


class Linear(torch.nn.Linear):
    """``nn.Linear`` with the same parameters and keys, whose inference-time forward with few
    rows goes through ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
