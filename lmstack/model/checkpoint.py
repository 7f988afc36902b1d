"""Checkpoint formats: Hugging Face folders in and out, and one entry point for every format.

* Hugging Face folder: ``config.json`` + ``model.safetensors`` (or sharded safetensors with
  ``model.safetensors.index.json``) + ``tokenizer.json`` / ``tokenizer_config.json``, for the
  GPT-2, Llama, Mistral and Qwen2 families.
* Native folder: ``model.safetensors`` (native keys, see ``model.py``), ``lmstack.json``
  (the ``ModelConfig``), the tokenizer files, and ``metadata.json`` recording where the
  weights came from (``native``, whose names this module re-exports).
* GGUF file: ``gguf_loader``, which converts it into a native folder once.

``load_checkpoint`` tells the three apart. Only safetensors and GGUF are read; nothing is ever
unpickled. Every write goes to a temporary folder that is renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from lmstack.errors import LMStackError, UnsupportedError
from lmstack.files import atomic_dir
from lmstack.model.config import ModelConfig
from lmstack.model.model import Transformer
from lmstack.model.native import (NATIVE_CONFIG, NATIVE_FORMAT, Convert, build_model, build_model_from,  # noqa: F401
                                  iter_safetensors, load_native, load_tokenizer, save_native, skip_init,
                                  state_for_save)

SUPPORTED_HF = ("gpt2", "llama", "mistral", "qwen2")

# -- Hugging Face config <-> ModelConfig ----------------------------------------------------


def _rope_theta(hf: dict) -> float:
    # Older configs write the scaling as rope_scaling ({"type" or "rope_type": ...}); transformers
    # 5 writes rope_parameters, which also carries rope_theta.
    for field in ("rope_scaling", "rope_parameters"):
        spec = hf.get(field) or {}
        kind = spec.get("rope_type", spec.get("type")) or "default"
        if kind != "default":
            raise UnsupportedError(f"config.json {field}: rope_type {kind!r} is not supported; expected plain RoPE "
                                   f"(rope_type 'default', or no {field}): RoPE scaling variants are left out")
    params = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta") or params.get("rope_theta", 10000.0))


# Config keys that give a decoder routed experts (Mixtral, Qwen2-MoE / Qwen3-MoE, DeepSeek, ...).
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _refuse_moe(hf: dict) -> None:
    for key in _MOE_KEYS:
        if hf.get(key):
            raise UnsupportedError(
                f"config.json {key}: got {hf[key]} (model_type {hf.get('model_type')!r}), expected no experts: "
                f"mixture of experts is not supported; supported: dense {', '.join(SUPPORTED_HF)} decoders"
            )


def config_from_hf(hf: dict) -> ModelConfig:
    _refuse_moe(hf)
    mt = hf.get("model_type")
    if mt not in SUPPORTED_HF:
        raise UnsupportedError(
            f"model_type {mt!r} (architectures {hf.get('architectures')}) is not supported; "
            f"supported: {', '.join(SUPPORTED_HF)}"
        )
    if mt == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedError(f"GPT-2 activation {act!r} is not supported; supported: gelu_new")
        return ModelConfig(
            arch="gpt2", vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024),
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
            intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"], pos="learned", norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"{mt} hidden_act {act!r} is not supported; supported: silu (SwiGLU)")
    if hf.get("mlp_bias"):
        raise UnsupportedError(f"{mt} with mlp_bias=true is not supported")
    n_head = hf["num_attention_heads"]
    sliding = None
    if mt == "mistral" or (mt == "qwen2" and hf.get("use_sliding_window")):
        sliding = hf.get("sliding_window")
    return ModelConfig(
        arch=mt, vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        intermediate_size=hf["intermediate_size"], pos="rope", rope_theta=_rope_theta(hf),
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", bias=False,
        qkv_bias=(mt == "qwen2") or bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", mt == "gpt2")), sliding_window=sliding,
    )


def config_to_hf(cfg: ModelConfig, tokenizer=None) -> dict:
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        if tokenizer.pad_token_id is not None:
            ids["pad_token_id"] = tokenizer.pad_token_id
    if cfg.arch == "gpt2":
        _require(cfg, pos="learned", norm="layernorm", mlp="gelu", bias=True)
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": cfg.intermediate_size, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "dtype": "float32", **ids,
        }
    _require(cfg, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    if cfg.n_head * cfg.head_dim != cfg.n_embd and cfg.arch == "qwen2":
        raise UnsupportedError("Qwen2 export needs head_dim * n_head == n_embd")
    if cfg.qkv_bias != (cfg.arch == "qwen2"):
        raise UnsupportedError(f"arch {cfg.arch!r} export with qkv_bias={cfg.qkv_bias} has no HF equivalent")
    arch_name = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    out = {
        "architectures": [arch_name[cfg.arch]], "model_type": cfg.arch, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.block_size, "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "dtype": "float32", **ids,
    }
    if cfg.arch == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if cfg.arch == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.arch == "qwen2":
        out.update(use_sliding_window=cfg.sliding_window is not None,
                   sliding_window=cfg.sliding_window, max_window_layers=cfg.n_layer)
    return out


def _require(cfg: ModelConfig, **want: Any) -> None:
    for k, v in want.items():
        if getattr(cfg, k) != v:
            raise UnsupportedError(
                f"cannot export arch {cfg.arch!r} with {k}={getattr(cfg, k)!r} to Hugging Face; "
                f"that family needs {k}={v!r}"
            )


# -- Hugging Face weights <-> native keys ---------------------------------------------------

_GPT2_TOP = {  # keys without the "transformer." prefix
    "wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "norm.weight", "ln_f.bias": "norm.bias",
}
_LLAMA_MAP = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LLAMA_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    **{f"self_attn.{p}_proj.{w}": f"attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")},
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}


def hf_to_native(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and for GPT-2, split and transpose) a Hugging Face state dict."""
    out: dict[str, torch.Tensor] = {}
    if cfg.arch == "gpt2":
        C = cfg.n_embd
        for k, t in sd.items():
            k = k[len("transformer."):] if k.startswith("transformer.") else k
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers in old checkpoints
            if k in _GPT2_TOP:
                out[_GPT2_TOP[k]] = t
            elif k == "lm_head.weight":
                if not cfg.tie_embeddings:
                    out["lm_head.weight"] = t
            elif k.startswith("h."):
                _, i, *rest = k.split(".")
                name, kind = ".".join(rest[:-1]), rest[-1]
                pre = f"blocks.{i}."
                if name == "ln_1":
                    out[pre + "attn_norm." + kind] = t
                elif name == "ln_2":
                    out[pre + "mlp_norm." + kind] = t
                elif name == "attn.c_attn":  # Conv1D: weight (C, 3C), split into q, k, v
                    parts = t.split(C, dim=-1)
                    for p, part in zip("qkv", parts):
                        out[pre + f"attn.{p}_proj.{kind}"] = part.t().contiguous() if kind == "weight" else part
                elif name in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                    tgt = {"attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
                    out[pre + tgt[name] + "." + kind] = t.t().contiguous() if kind == "weight" else t
                else:
                    raise UnsupportedError(f"unexpected GPT-2 tensor {k!r}")
            else:
                raise UnsupportedError(f"unexpected GPT-2 tensor {k!r}")
        return out
    for k, t in sd.items():
        if k in _LLAMA_MAP:
            if k == "lm_head.weight" and cfg.tie_embeddings:
                continue
            out[_LLAMA_MAP[k]] = t
        elif k.startswith("model.layers."):
            _, _, i, rest = k.split(".", 3)
            if rest.endswith("rotary_emb.inv_freq"):
                continue
            if rest not in _LLAMA_LAYER:
                raise UnsupportedError(f"unexpected {cfg.arch} tensor {k!r}")
            out[f"blocks.{i}.{_LLAMA_LAYER[rest]}"] = t
        else:
            raise UnsupportedError(f"unexpected {cfg.arch} tensor {k!r}")
    return out


def native_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if cfg.arch == "gpt2":
        inv_top = {v: "transformer." + k for k, v in _GPT2_TOP.items()}
        for k, t in sd.items():
            if k in inv_top:
                out[inv_top[k]] = t
            elif k == "lm_head.weight":
                out["lm_head.weight"] = t
        for i in range(cfg.n_layer):
            pre, hpre = f"blocks.{i}.", f"transformer.h.{i}."
            for kind in ("weight", "bias"):
                out[hpre + f"ln_1.{kind}"] = sd[pre + f"attn_norm.{kind}"]
                out[hpre + f"ln_2.{kind}"] = sd[pre + f"mlp_norm.{kind}"]
                qkv = [sd[pre + f"attn.{p}_proj.{kind}"] for p in "qkv"]
                if kind == "weight":
                    out[hpre + "attn.c_attn.weight"] = torch.cat([w.t() for w in qkv], dim=1).contiguous()
                else:
                    out[hpre + "attn.c_attn.bias"] = torch.cat(qkv)
                for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                                     ("mlp.down_proj", "mlp.c_proj")):
                    t = sd[pre + f"{ours}.{kind}"]
                    out[hpre + f"{theirs}.{kind}"] = t.t().contiguous() if kind == "weight" else t
        return out
    inv_top = {v: k for k, v in _LLAMA_MAP.items()}
    inv_layer = {v: k for k, v in _LLAMA_LAYER.items()}
    for k, t in sd.items():
        if k in inv_top:
            out[inv_top[k]] = t
        else:
            _, i, rest = k.split(".", 2)
            out[f"model.layers.{i}.{inv_layer[rest]}"] = t
    return out


# -- reading ----------------------------------------------------------------------------------


def read_safetensors_dir(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: single ``model.safetensors`` or an indexed shard set (mmap)."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in safetensors_files(folder):
        sd.update(load_file(str(f)))
    return sd


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: ``model.safetensors``, an indexed shard set or any ``*.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise LMStackError(f"{index.name} names {', '.join(missing)}, which is missing from {folder} "
                               f"(expected all {len(files)} shards it lists)")
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in folder.iterdir())[:10]
        bins = [f for f in found if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = " (pickle-based weights are never loaded; convert them to safetensors)" if bins else ""
        raise LMStackError(f"no *.safetensors weights in {folder}; found {found}{hint}")
    return [folder / f for f in files]


def load_hf(folder: str | os.PathLike, dtype: Optional[torch.dtype] = None, device="cpu",
            convert: Optional[Convert] = None):
    folder = Path(folder)
    cfg_path = folder / "config.json"
    try:
        hf = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LMStackError(f"cannot read Hugging Face config {cfg_path}: {e}") from None
    cfg = config_from_hf(hf)
    if convert is None:
        model = build_model(cfg, hf_to_native(read_safetensors_dir(folder), cfg), dtype, device)
    else:  # every Hugging Face key converts on its own (renames; GPT-2's fused qkv splits in three)
        stream = (kv for k, t in iter_safetensors(safetensors_files(folder))
                  for kv in hf_to_native({k: t}, cfg).items())
        model = build_model_from(cfg, stream, dtype, device, convert)
    return model, load_tokenizer(folder), {"source": str(folder), "source_format": "huggingface"}


# -- writing --------------------------------------------------------------------------------


def export_hf(model: Transformer, folder: str | os.PathLike, tokenizer=None,
              dtype: Optional[torch.dtype] = None) -> Path:
    """Write a Hugging Face folder that ``transformers`` loads with the same logits."""
    from safetensors.torch import save_file

    cfg = model.config
    hf_cfg = config_to_hf(cfg, tokenizer)
    sd = native_to_hf(state_for_save(model, dtype), cfg)
    if dtype is not None:
        hf_cfg["dtype"] = str(dtype).replace("torch.", "")
    with atomic_dir(folder) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
            gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_cfg}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return Path(folder)


# -- one entry point ------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike, dtype: Optional[torch.dtype] = None, device="cpu",
                    convert: Optional[Convert] = None):
    """(model, tokenizer or None, metadata) from a native folder, an HF folder or a .gguf file.

    With ``convert`` (see ``Convert``) the checkpoint is read one tensor at a time and each goes
    through it first: a QLoRA base is quantised as it loads and its full-precision weights are
    never all in memory together.
    """
    p = Path(path)
    if not p.exists():
        raise LMStackError(f"model not found: {p} (expected a preset name, a model folder or a .gguf file)")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            from lmstack.model.gguf_loader import load_gguf

            return load_gguf(p, dtype=dtype, device=device, convert=convert)
        raise UnsupportedError(
            f"{p.name}: unsupported model file; expected a .gguf file or a folder with "
            "config.json (Hugging Face) or lmstack.json (native)"
        )
    if (p / NATIVE_CONFIG).is_file():
        return load_native(p, dtype, device, convert)
    if (p / "config.json").is_file():
        return load_hf(p, dtype, device, convert)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        from lmstack.model.gguf_loader import load_gguf

        return load_gguf(ggufs[0], dtype=dtype, device=device, convert=convert)
    found = sorted(x.name for x in p.iterdir())[:8]
    raise UnsupportedError(
        f"{p}: not a model folder (found {found}); expected config.json (Hugging Face), "
        f"lmstack.json (native) or a single .gguf file"
    )
