"""Load GGUF files (llama.cpp's format) through the ``gguf`` package.

Tensors are dequantised to fp32 with ``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_x, Q2_K..Q6_K: whatever that package supports). llama.cpp's converter
permutes the q/k rows of RoPE models from the "rotate half" layout into interleaved pairs;
we undo that permutation so the weights match the Hugging Face layout our model uses.
The tokenizer and chat template come from the GGUF metadata.

The first load of a file converts it into a native folder under the cache directory
(``$LMSTACK_CACHE`` or ``~/.cache/lmstack``); later loads memory-map that folder.
Deliberately left out: running quantised matmuls directly (see ``lmstack.quant``), and
architectures beyond llama / mistral / qwen2 / gpt2.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lmstack.errors import ConfigError, LMStackError, UnsupportedError
from lmstack.model.config import ModelConfig
from lmstack.model.native import NATIVE_CONFIG, build_model, load_native, save_native

SUPPORTED_GGUF_ARCH = ("llama", "qwen2", "gpt2")


def cache_dir() -> Path:
    return Path(os.environ.get("LMSTACK_CACHE", Path.home() / ".cache" / "lmstack"))


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _file_key(path: Path) -> str:
    """Content key: size + hashes of the first and last 4 MiB (fast on large files)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
        if size > 8 << 20:
            f.seek(-(4 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:24]


def config_from_gguf(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCH:
        raise UnsupportedError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCH)}"
        )
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_head = int(g("attention.head_count"))
    n_embd = int(g("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = g("vocab_size") or (len(tokens.data) if tokens is not None else None)
    names = {t.name for t in reader.tensors}
    if vocab is None:
        emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
        vocab = int(emb.shape[1])
    common = dict(vocab_size=int(vocab), block_size=int(g("context_length", 2048)),
                  n_layer=int(g("block_count")), n_head=n_head, n_embd=n_embd,
                  intermediate_size=int(g("feed_forward_length", 4 * n_embd)),
                  tie_embeddings="output.weight" not in names)
    if arch == "gpt2":
        return ModelConfig(arch="gpt2", pos="learned", norm="layernorm", mlp="gelu", bias=True,
                           norm_eps=float(g("attention.layer_norm_epsilon", 1e-5)), **common)
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise UnsupportedError("GGUF with RoPE scaling is not supported; supported: plain RoPE")
    head_dim = int(g("attention.key_length", g("rope.dimension_count", n_embd // n_head)))
    return ModelConfig(arch="qwen2" if arch == "qwen2" else "llama", pos="rope",
                       norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias="blk.0.attn_q.bias" in names,
                       n_kv_head=int(g("attention.head_count_kv", n_head)), head_dim=head_dim,
                       rope_theta=float(g("rope.freq_base", 10000.0)),
                       norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)), **common)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation: interleaved (x0,y0,x1,y1,..) -> halves (x.., y..)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER = {
    "attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "tok_emb", "position_embd": "pos_emb", "output_norm": "norm", "output": "lm_head"}


def gguf_state_dict(reader, cfg: ModelConfig, progress: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict, fp32. ``progress``: a bar over the tensors on stderr (where it is a terminal)."""
    from gguf import quants
    from tqdm import tqdm

    sd: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="dequantising", unit="tensor", file=sys.stderr, dynamic_ncols=True,
                  disable=None if progress else True):
        try:
            w = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UnsupportedError(
                f"GGUF tensor {t.name} has type {t.tensor_type.name}, which the gguf package cannot dequantise"
            ) from None
        w = np.asarray(w, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        base, kind = t.name.rsplit(".", 1)
        if base.startswith("blk."):
            _, i, name = base.split(".", 2)
            if name == "attn_qkv":  # GPT-2: fused rows [q; k; v]
                for p, part in zip("qkv", np.split(w, 3, axis=0)):
                    sd[f"blocks.{i}.attn.{p}_proj.{kind}"] = torch.from_numpy(np.array(part, order="C", copy=True))  # a view of a read-only mmap
                continue
            if name not in _LAYER:
                raise UnsupportedError(f"unexpected GGUF tensor {t.name!r} for arch {cfg.arch}")
            if cfg.arch == "llama" and name == "attn_q":
                w = unpermute_rope_rows(w, cfg.n_head)
            elif cfg.arch == "llama" and name == "attn_k":
                w = unpermute_rope_rows(w, cfg.n_kv_head)
            key = f"blocks.{i}.{_LAYER[name]}.{kind}"
        elif base in _TOP:
            key = f"{_TOP[base]}.{kind}"
        else:
            raise UnsupportedError(f"unexpected GGUF tensor {t.name!r}")
        sd[key] = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))  # F32 tensors are read-only mmaps
    return sd


def load_gguf(path: str | os.PathLike, dtype: Optional[torch.dtype] = None, device="cpu",
              use_cache: bool = True, convert=None):
    """(model, tokenizer, metadata) from a GGUF file; converts once into the cache folder.

    ``convert`` (see ``lmstack.model.native.Convert``) applies when the model is read back
    from that folder, one tensor at a time; the first conversion holds the whole fp32 model once.
    """
    path = Path(path)
    cached = cache_dir() / "gguf" / f"{path.stem}-{_file_key(path)}"
    if use_cache and (cached / NATIVE_CONFIG).is_file():
        try:
            return load_native(cached, dtype, device, convert)
        except ConfigError:  # the caller's settings (``convert``'s), not the cache entry
            raise
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            pass
    import gguf

    from lmstack.tokenizer import Tokenizer

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise LMStackError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    cfg = config_from_gguf(reader)
    if use_cache:  # about half a minute for a 135M model, once: say so rather than sit silent
        print(f"converting {path.name} to a cached fp32 copy under {cached.parent} (once)", file=sys.stderr)
    sd = gguf_state_dict(reader, cfg, progress=True)
    tokenizer = Tokenizer.from_gguf(reader)
    meta = {"source": path.name, "source_format": "gguf",
            "source_file_type": int(_field(reader, "general.file_type", -1)),
            "source_name": _field(reader, "general.name")}
    model = build_model(cfg, sd, torch.float32, "cpu")
    if use_cache:
        try:
            save_native(model, cached, tokenizer=tokenizer, metadata=meta)
        except OSError:
            pass  # a read-only cache only costs speed
        else:
            if convert is not None:
                del model, sd
                return load_native(cached, dtype, device, convert)
    if convert is not None:
        return build_model(cfg, dict(model.state_dict()), dtype, device, convert), tokenizer, meta
    if dtype is not None and dtype != torch.float32 or str(device) != "cpu":
        model = model.to(device=device, dtype=dtype or torch.float32)
    return model, tokenizer, meta
