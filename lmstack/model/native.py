"""lmstack's native checkpoint folder, and building a model from a stream of tensors.

A native folder holds ``model.safetensors`` (native keys, see ``model.py``), ``lmstack.json``
(the ``ModelConfig``, the stored dtype and ``NATIVE_FORMAT``), the tokenizer files, and
``metadata.json`` recording where the weights came from. Every reader of weights
(``checkpoint`` for Hugging Face folders, ``gguf_loader`` for GGUF files) ends in
``build_model_from``: the model is built on the meta device without a random init, adopts each
tensor as it arrives, and gets the CPU decoding kernels swapped in (``fast.install``). The
folder is written through ``lmstack.files.atomic_dir``, so a crash never leaves half of one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from lmstack.errors import LMStackError, UnsupportedError
from lmstack.files import atomic_dir
from lmstack.model.config import ModelConfig
from lmstack.model.fast import install
from lmstack.model.model import Transformer, rope_tables

NATIVE_CONFIG = "lmstack.json"
NATIVE_FORMAT = "lmstack-native-v1"

# -- building -------------------------------------------------------------------------------


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def skip_init():
    """Build modules without running ``torch.nn.init`` (a checkpoint supplies every tensor).

    On the meta device the init is wasted work, and torch routes it through its reference
    implementations, which import the whole compiler stack (~65 MiB of RSS, ~1 s).
    """
    saved = {n: getattr(nn.init, n) for n in _INIT_FUNCTIONS if hasattr(nn.init, n)}
    for n in saved:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


Convert = Callable[[nn.Module, str, torch.Tensor], bool]
"""``convert(model, key, tensor)`` sees each checkpoint tensor as it is read (native key, target
dtype and device) and returns True when it took the tensor itself, for example by swapping the
module that owns it for a quantised one (``lmstack.quant.quantizing_loader``)."""


def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
                device: str | torch.device = "cpu", convert: Optional[Convert] = None) -> Transformer:
    """Instantiate without a random init (meta device) and adopt the given tensors."""
    return build_model_from(cfg, sd.items(), dtype, device, convert)


def build_model_from(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                     dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu",
                     convert: Optional[Convert] = None) -> Transformer:
    """Build the model one ``(native key, tensor)`` at a time, so a stream of tensors read one by
    one is never all in memory at once. With ``convert``, the tensors it does not take are copied
    into memory of their own, so no file mapping outlives the load."""
    with torch.device("meta"), skip_init():
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    seen, unexpected = set(), []
    target = dtype or torch.float32  # fp16 compute is very slow on CPUs; bf16 stays bf16 only when asked for
    for key, t in tensors:
        if key not in expected or key in seen:
            unexpected.append(key)
            continue
        if tuple(t.shape) != expected[key]:
            raise LMStackError(f"checkpoint tensor {key!r} has shape {tuple(t.shape)}; the model's config "
                               f"expects {expected[key]}")
        seen.add(key)
        src = t
        t = t.to(device=device, dtype=target if t.is_floating_point() else t.dtype)
        if convert is not None:
            if convert(model, key, t):
                continue
            if t is src:
                t = t.clone()
        _adopt(model, key, t)
    missing = set(expected) - seen
    if missing or unexpected:
        raise LMStackError(
            f"checkpoint does not match the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if cfg.pos == "rope":
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return install(model.eval())  # the CPU decoding kernels, where they apply


def _adopt(model: nn.Module, key: str, t: torch.Tensor) -> None:
    """Put ``t`` in place of the (meta) parameter or buffer ``key``, keeping its requires_grad."""
    prefix, _, name = key.rpartition(".")
    mod = model.get_submodule(prefix) if prefix else model
    if name in mod._parameters:
        mod._parameters[name] = nn.Parameter(t, requires_grad=mod._parameters[name].requires_grad)
    elif name in mod._buffers:
        mod._buffers[name] = t
    else:
        raise LMStackError(f"checkpoint tensor {key!r} has no parameter or buffer in the model")


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of safetensors files, one at a time, each read through a mapping of its own.

    A single open file would keep every page read so far resident until the last of its tensors
    is freed; reopening per tensor (cheap: the header is parsed again) lets each one go as soon
    as the caller drops it, so converting a checkpoint costs about one tensor at a time.
    """
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as h:
            keys = list(h.keys())
        for k in keys:
            with safe_open(str(f), framework="pt") as h:
                t = h.get_tensor(k)
            yield k, t
            del t



# -- the native folder ----------------------------------------------------------------------


def load_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").is_file():
        return None
    from lmstack.tokenizer import Tokenizer

    return Tokenizer.load(folder)


def load_native(folder: str | os.PathLike, dtype: Optional[torch.dtype] = None, device="cpu",
                convert: Optional[Convert] = None):
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_cfg = json.loads((folder / NATIVE_CONFIG).read_text())
    if meta_cfg.get("format") != NATIVE_FORMAT:
        raise UnsupportedError(
            f"{folder / NATIVE_CONFIG}: format {meta_cfg.get('format')!r}, expected {NATIVE_FORMAT!r}"
        )
    cfg = ModelConfig.from_dict(meta_cfg["model"])
    dtype = dtype or getattr(torch, meta_cfg.get("dtype", "float32"))
    if convert is None:  # one mapping of the whole file: pages are read when first used
        model = build_model(cfg, load_file(str(folder / "model.safetensors")), dtype, device)
    else:
        model = build_model_from(cfg, iter_safetensors([folder / "model.safetensors"]), dtype, device, convert)
    meta_path = folder / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return model, load_tokenizer(folder), meta


def state_for_save(model: Transformer, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        if not torch.isfinite(v).all():
            raise LMStackError(f"refusing to save: tensor {k} has non-finite values")
        sd[k] = v.contiguous()
    return sd


def save_native(model: Transformer, folder: str | os.PathLike, tokenizer=None,
                metadata: Optional[dict] = None, dtype: Optional[torch.dtype] = None) -> Path:
    from safetensors.torch import save_file

    from lmstack import __version__

    sd = state_for_save(model, dtype)
    stored = str(next(iter(sd.values())).dtype).replace("torch.", "")
    meta = {
        "format": NATIVE_FORMAT, "lmstack_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "num_params": model.num_params(), **(metadata or {}),
    }
    with atomic_dir(folder) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = {"format": NATIVE_FORMAT, "dtype": stored, "model": model.config.to_dict()}
        (tmp / NATIVE_CONFIG).write_text(json.dumps(cfg, indent=2))
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)

