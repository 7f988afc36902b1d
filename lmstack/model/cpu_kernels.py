"""Memory-bound CPU kernels for decoding: linear layers with only a few input rows.

At decode time each step multiplies one row per sequence by every weight matrix, so the step
time is the time to stream the weights from memory. torch's CPU GEMV reaches about a quarter
of the bandwidth a plain reduction gets on the same cores (see docs/benchmarks.md), so
inference-time calls with at most ``MAX_ROWS`` rows go to a small C kernel
(``kernels/small_linear.c``) and everything else to torch:

* ``linear``: one weight matrix (``F.linear``);
* ``linear_group``: several matrices over the same input in one threaded pass (q/k/v);
* ``swiglu``: ``silu(x W_gate^T) * (x W_up^T)`` in one pass over both matrices;
* ``rms_norm``: RMSNorm of a few rows (torch's is a chain of six small ops);
* ``rope_`` and ``decode_attention``: rotary positions and attention for one new token per
  sequence, where torch spends more time dispatching than computing.

The group and fused entry points return ``None`` where the kernel does not apply, and the
caller runs its ordinary torch code. The model calls none of them itself: ``lmstack.model.fast``
swaps its modules for kernel-backed subclasses when a checkpoint is loaded.

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
            r = subprocess.run(base + flags + [str(_SOURCE), "-o", str(tmp_so), "-lm"], capture_output=True, text=True)
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
            for old in d.glob("small_linear-*.so"):  # builds of earlier sources or compilers
                if old != so:
                    old.unlink(missing_ok=True)  # a process that has one loaded keeps its mapping
        lib = ctypes.CDLL(str(so))
        p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        sigs = {"lm_small_linear": [c_int, p, p, p, p, i64, i64, i64, c_int],
                "lm_small_linear_group": [c_int, p, c_int, p, p, p, p, i64, i64, c_int, c_int],
                "lm_rmsnorm": [c_int, p, p, p, i64, i64, ctypes.c_float],
                "lm_rope": [c_int, p, p, p, i64, i64, i64],
                "lm_decode_attention": [c_int, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i64,
                                        ctypes.c_float, c_int],
                "lm_int4_linear": [c_int, p, p, p, p, p, i64, i64, i64, i64, c_int]}
        for name, argtypes in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = ctypes.c_int, argtypes
        _FN.update(linear=lib.lm_small_linear, group=lib.lm_small_linear_group, rmsnorm=lib.lm_rmsnorm,
                   rope=lib.lm_rope, attention=lib.lm_decode_attention, int4=lib.lm_int4_linear)
    except Exception as e:  # never fatal: the torch path is always there
        log.warning("CPU decode kernel unavailable (%s); using torch's linear", str(e)[:300])
        return None
    _lib = lib
    return lib


def available() -> bool:
    return load() is not None


_BF16 = {torch.float32: 0, torch.bfloat16: 1}


def _applies(x: torch.Tensor, *params: Optional[torch.Tensor], strided: bool = False) -> bool:
    """Whether the kernel can take ``x`` (a few rows) and ``params`` (weights, biases, None):
    CPU, fp32 or bf16 throughout, contiguous parameters (unless the kernel takes their
    ``strided`` layout), plain tensors, no gradient needed. Called ~300 times per decoded
    token, so the cheap checks come first."""
    if torch.compiler.is_compiling():  # traced code keeps torch's ops (True while dynamo traces)
        return False
    if _lib is None:
        load()
    if not _lib:
        return False
    dt = x.dtype
    if dt not in _BF16 or x.device.type != "cpu":
        return False
    grad = torch.is_grad_enabled() and x.requires_grad
    for t in params:
        if t is None:
            continue
        if t.dtype != dt or not (strided or t.is_contiguous()) or (type(t) is not torch.nn.Parameter
                                                                   and type(t) is not torch.Tensor):
            return False
        grad = grad or (torch.is_grad_enabled() and t.requires_grad)
    return not grad


def _rows(x: torch.Tensor, K: int) -> int:
    """Rows of ``x`` for a kernel over inputs of width ``K``; 0 when it does not fit."""
    n = x.numel()
    if n == 0 or n > MAX_ROWS * K or x.shape[-1] != K:
        return 0
    return n // K


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the small-batch kernel where it applies: CPU,
    fp32 or bf16, no gradient needed, at most ``MAX_ROWS`` rows of ``x``."""
    K = weight.shape[-1]
    M = _rows(x, K)
    if not M or weight.dim() != 2 or not _applies(x, weight, bias):
        return F.linear(x, weight, bias)
    x = x.contiguous()
    N = weight.shape[0]
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype)
    if _FN["linear"](_BF16[x.dtype], x.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(),
                     M, N, K, torch.get_num_threads()) != 0:
        return F.linear(x, weight, bias)
    return y


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                group_size: int) -> Optional[torch.Tensor]:
    """``x @ dequantize(packed, scales).T + bias`` for group-wise int4 weights (``lmstack.quant``'s
    layout), without building the fp32 weight: CPU, fp32, no gradient needed, at most
    ``MAX_ROWS`` rows, groups a multiple of 32. ``None`` where it does not apply."""
    K = packed.shape[-1] * 2
    M = _rows(x, K)
    if (not M or x.dtype != torch.float32 or packed.dtype != torch.uint8 or scales.dtype != torch.float32
            or group_size % 32 or K % group_size or not packed.is_contiguous() or not scales.is_contiguous()
            or not _applies(x, bias)):
        return None
    x = x.contiguous()
    N = packed.shape[0]
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype)
    if _FN["int4"](0, x.data_ptr(), packed.data_ptr(), scales.data_ptr(), _ptr(bias), y.data_ptr(), M, N, K,
                   group_size, torch.get_num_threads()) != 0:
        return None
    return y


def _group(x: torch.Tensor, weights: list, biases: list, swiglu: bool) -> Optional[list[torch.Tensor]]:
    K = weights[0].shape[-1]
    M = _rows(x, K)
    if not M or any(w.dim() != 2 or w.shape[1] != K for w in weights) or not _applies(x, *weights, *biases):
        return None
    x = x.contiguous()
    n = len(weights)
    outs = [torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype) for w in (weights[:1] if swiglu else weights)]
    arr = ctypes.c_int64 * n
    ys = arr(*(o.data_ptr() for o in outs), *([0] * (n - len(outs))))
    rc = _FN["group"](_BF16[x.dtype], x.data_ptr(), n, arr(*(w.data_ptr() for w in weights)),
                      arr(*(_ptr(b) for b in biases)), ys, arr(*(w.shape[0] for w in weights)), M, K, int(swiglu),
                      torch.get_num_threads())
    return outs if rc == 0 else None


def linear_group(x: torch.Tensor, weights: list, biases: list) -> Optional[list[torch.Tensor]]:
    """``[F.linear(x, w, b) for w, b in zip(weights, biases)]`` in one threaded pass over all
    the weights (up to 4, same input width), or ``None`` where the kernel does not apply."""
    return _group(x, list(weights), list(biases), swiglu=False)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
           b_gate: Optional[torch.Tensor] = None, b_up: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)`` in one pass, rounded
    where torch's bf16 ops round, or ``None`` where the kernel does not apply."""
    if w_gate.shape != w_up.shape:
        return None
    out = _group(x, [w_gate, w_up], [b_gate, b_up], swiglu=True)
    return None if out is None else out[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Optional[torch.Tensor]:
    """RMSNorm of ``x`` (a few rows) normalised in fp32, or ``None`` where the kernel does not apply."""
    K = weight.shape[-1]
    M = _rows(x, K)
    if not M or weight.dim() != 1 or not _applies(x, weight):
        return None
    x = x.contiguous()
    y = torch.empty_like(x)
    _FN["rmsnorm"](_BF16[x.dtype], x.data_ptr(), weight.data_ptr(), y.data_ptr(), M, K, eps)
    return y


def rope_(cos: torch.Tensor, sin: torch.Tensor, *xs: torch.Tensor) -> bool:
    """Apply rotary positions in place to each of ``xs`` (B, H, 1, D) for one decode step
    (``cos`` and the signed ``sin`` of ``model.rope_tables`` gathered to (B, 1, 1, D)).
    All of ``xs`` are checked first: either every one is rotated (True) or none is (False)."""
    for x in xs:
        if x.dim() != 4 or x.shape[2] != 1 or not x.is_contiguous():
            return False
        B, _, _, D = x.shape
        if cos.shape != (B, 1, 1, D) or sin.shape != (B, 1, 1, D) or not _applies(x, cos, sin):
            return False
        if D % 2 or D > 1024:
            return False
    for x in xs:
        B, H, _, D = x.shape
        _FN["rope"](_BF16[x.dtype], x.data_ptr(), cos.data_ptr(), sin.data_ptr(), B, H, D)
    return True


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
    """Softmax attention of one query per row over all ``S`` keys (no mask): ``q`` (B, G, R, D)
    with R query heads sharing each of the G kv heads, ``k`` and ``v`` (B, G, S, D) views of
    the cache. Returns (B, G, R, D), or ``None`` where the kernel does not apply."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.stride() != v.stride() or k.stride(3) != 1:
        return None
    B, G, R, D = q.shape
    if k.shape[0] != B or k.shape[1] != G or k.shape[3] != D or not _applies(q, k, v, strided=True):
        return None
    q = q.contiguous()
    out = torch.empty_like(q)
    sb, sg, ss, _ = k.stride()
    rc = _FN["attention"](_BF16[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                          B, G, R, k.shape[2], D, sb, sg, ss, D ** -0.5, torch.get_num_threads())
    return out if rc == 0 else None
