"""LoRA adapters in Hugging Face PEFT's folder format, both ways.

A PEFT LoRA folder is ``adapter_config.json`` (a ``LoraConfig``: ``r``, ``lora_alpha``,
``target_modules``, per-module ``rank_pattern`` / ``alpha_pattern``) and
``adapter_model.safetensors`` with one pair of tensors per adapted module of the
``transformers`` model::

    base_model.model.<HF module>.lora_A.weight   (r, in)
    base_model.model.<HF module>.lora_B.weight   (out, r)

and the update is ``(lora_alpha / r) * B A`` as in ``lmstack.peft.lora``. Module names follow
``model.checkpoint``'s mapping: ``blocks.i.attn.q_proj`` is ``model.layers.i.self_attn.q_proj``
(Llama, Mistral, Qwen2). GPT-2 keeps q, k and v in one fused ``attn.c_attn`` (rows ``[q; k; v]``),
so our separate q/k/v updates are written as one update of rank ``R = sum of their ranks``:

    A = [A_q; A_k; A_v]   (R, C)        B = blockdiag(B_q, B_k, B_v)   (3C, R)

(a module without LoRA leaves its rows of ``B`` zero), which is the same function; when
all three share one ``A`` (an adapter that came from PEFT) it stays rank ``r`` with
``B = [B_q; B_k; B_v]``. Reading splits a fused update back into the three row blocks, each
with the whole ``A``.

What lmstack alone needs (the method, e.g. QLoRA's quantisation, and the base model's
shape, checked on load) travels in the safetensors header under ``lmstack``, which PEFT
ignores. Left out: DoRA, rsLoRA, LoRA on embeddings, trained biases and ``modules_to_save``;
a PEFT folder asking for them is refused by name.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
import torch
import torch.nn as nn

from lmstack.config import config_from_dict
from lmstack.errors import LMStackError, UnsupportedError
from lmstack.peft.config import ALL_LINEARS, PEFTConfig
from lmstack.peft.lora import LoRALinear

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."

_LLAMA = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
          "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
          "down_proj": "mlp.down_proj"}
_GPT2 = {"q_proj": "attn.c_attn", "k_proj": "attn.c_attn", "v_proj": "attn.c_attn", "o_proj": "attn.c_proj",
         "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}
_FUSED = ("q_proj", "k_proj", "v_proj")  # GPT-2's c_attn, in row order


def _native(i: int, leaf: str) -> str:
    return f"blocks.{i}.{'attn' if leaf in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{leaf}"


def _hf_module(arch: str, i: int, leaf: str) -> str:
    if arch == "gpt2":
        return f"transformer.h.{i}.{_GPT2[leaf]}"
    return f"model.layers.{i}.{_LLAMA[leaf]}"


def _native_parts(arch: str, hf_name: str) -> list[str] | None:
    """The native modules behind one HF module name (three for GPT-2's c_attn), or None."""
    table = _GPT2 if arch == "gpt2" else _LLAMA
    stem = r"transformer\.h" if arch == "gpt2" else r"model\.layers"
    m = re.fullmatch(rf"{stem}\.(\d+)\.(.+)", hf_name)
    if m is None:
        return None
    leaves = [leaf for leaf, hf in table.items() if hf == m.group(2)]
    return [_native(int(m.group(1)), leaf) for leaf in leaves] or None


def _pattern(patterns: dict, name: str, default):
    """PEFT's rule: the first pattern key that matches the end of the module name, at a dot."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# -- writing ----------------------------------------------------------------------------------


def peft_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """PEFT's tensors for ``model``'s LoRA layers and each HF module's ``(rank, alpha)``."""
    cfg = model.config
    loras = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, float]] = {}
    for i in range(cfg.n_layer):
        for leaf in ALL_LINEARS:
            m = loras.get(_native(i, leaf))
            if m is None or (cfg.arch == "gpt2" and leaf in _FUSED):
                continue
            hf = _hf_module(cfg.arch, i, leaf)
            out[f"{PREFIX}{hf}.lora_A.weight"], out[f"{PREFIX}{hf}.lora_B.weight"] = m.lora_A, m.lora_B
            shapes[hf] = (m.r, m.alpha)
        if cfg.arch != "gpt2":
            continue
        parts = [loras.get(_native(i, leaf)) for leaf in _FUSED]
        present = [m for m in parts if m is not None]
        if not present:
            continue
        hf, first = _hf_module("gpt2", i, "q_proj"), present[0]
        shared = len(present) == 3 and all(torch.equal(m.lora_A, first.lora_A) and m.scaling == first.scaling
                                           for m in present)
        if shared:
            a, b = first.lora_A, torch.cat([m.lora_B for m in present])
        else:  # stacked A, block-diagonal B; each block rescaled to the first layer's alpha / r
            a = torch.cat([m.lora_A for m in present])
            b = torch.zeros(3 * cfg.n_embd, a.shape[0], dtype=a.dtype, device=a.device)
            col = 0
            for row, m in enumerate(parts):
                if m is not None:
                    b[row * cfg.n_embd:(row + 1) * cfg.n_embd, col:col + m.r] = m.lora_B * (m.scaling / first.scaling)
                    col += m.r
        out[f"{PREFIX}{hf}.lora_A.weight"], out[f"{PREFIX}{hf}.lora_B.weight"] = a, b
        shapes[hf] = (a.shape[0], first.scaling * a.shape[0])
    return out, shapes


def peft_config(model: nn.Module, cfg: PEFTConfig, shapes: dict[str, tuple[int, float]]) -> dict:
    """PEFT's ``adapter_config.json`` for the modules in ``shapes``."""
    arch, n_layer = model.config.arch, model.config.n_layer
    leaves = sorted({hf.split(".", 3)[3] for hf in shapes})  # e.g. self_attn.q_proj, attn.c_attn
    every_layer = len(shapes) == n_layer * len(leaves)
    # A bare leaf name ("q_proj") is PEFT's usual form; GPT-2's two c_proj need their parent.
    targets = sorted({leaf if arch == "gpt2" else leaf.split(".")[-1] for leaf in leaves}) if every_layer \
        else sorted(shapes)
    rank_pattern = {hf: r for hf, (r, _) in shapes.items() if r != cfg.r}
    alpha_pattern = {hf: a for hf, (_, a) in shapes.items() if a != cfg.alpha}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": arch == "gpt2", "bias": "none", "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
        "layers_pattern": None,
    }


def write_peft(model: nn.Module, cfg: PEFTConfig, folder: Path) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` into ``folder`` (already created)."""
    from safetensors.torch import save_file

    from lmstack.model.checkpoint import config_to_hf

    config_to_hf(model.config)  # the base must have a transformers equivalent (raises if not)
    tensors, shapes = peft_tensors(model)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise LMStackError(f"refusing to save the adapter: tensor {k} has non-finite values")
    ours = {"peft": asdict(cfg), "base_model": model.config.to_dict()}
    save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt", "lmstack": json.dumps(ours)})
    (folder / PEFT_CONFIG).write_text(json.dumps(peft_config(model, cfg, shapes), indent=2))


# -- reading ----------------------------------------------------------------------------------


def _refuse_unsupported(folder: Path, hf_cfg: dict) -> None:
    if hf_cfg.get("peft_type") != "LORA":
        raise UnsupportedError(f"{folder / PEFT_CONFIG}: peft_type {hf_cfg.get('peft_type')!r}; "
                               "only LORA adapters are read (lmstack's own prefix and bottleneck adapters "
                               "are saved in its own format)")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("bias", "none")):
        if hf_cfg.get(key, ok) != ok:
            raise UnsupportedError(f"{folder / PEFT_CONFIG}: {key}={hf_cfg[key]!r} is not supported; "
                                   f"expected {ok!r}")
    for key in ("modules_to_save", "trainable_token_indices"):
        if hf_cfg.get(key):
            raise UnsupportedError(f"{folder / PEFT_CONFIG}: {key}={hf_cfg[key]!r} is not supported; "
                                   "expected none (only lora_A / lora_B are read)")


def read_peft(model: nn.Module, folder: Path) -> tuple[PEFTConfig, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """A PEFT folder as ``(config, {native module: (lora_A, lora_B, alpha)})``, checked against
    ``model`` (the base it will be attached to; left unchanged here)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        hf_cfg = json.loads((folder / PEFT_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise LMStackError(f"{folder / PEFT_CONFIG}: not valid JSON ({e})") from None
    _refuse_unsupported(folder, hf_cfg)
    with safe_open(str(folder / PEFT_WEIGHTS), "pt") as f:
        ours = json.loads((f.metadata() or {}).get("lmstack", "null"))
    cfg_now = model.config.to_dict()
    if ours is not None and ours["base_model"] != cfg_now:
        diff = sorted(k for k in ours["base_model"] if ours["base_model"][k] != cfg_now.get(k))
        raise LMStackError(f"{folder}: the adapter was trained on a different base model (differs in {diff})")
    sd = load_file(str(folder / PEFT_WEIGHTS))
    # {HF module: {"lora_A": tensor, "lora_B": tensor}}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A|lora_B)(?:\.[\w-]+)?\.weight", key)
        if m is None:
            raise UnsupportedError(f"{folder / PEFT_WEIGHTS}: tensor {key!r} is not a LoRA A/B weight "
                                   "(embeddings, biases and DoRA magnitudes are not read)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    r0, alpha0 = int(hf_cfg.get("r", 8)), float(hf_cfg.get("lora_alpha", 8))
    arch = model.config.arch
    targets = set(ours["peft"]["targets"]) if ours is not None else set(ALL_LINEARS)
    modules = dict(model.named_modules())
    # {native module: (lora_A, lora_B, alpha)}
    plan: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for hf, ab in sorted(pairs.items()):
        natives = _native_parts(arch, hf)
        if natives is None or set(ab) != {"lora_A", "lora_B"}:
            raise LMStackError(f"{folder / PEFT_WEIGHTS}: {hf!r} is not a {arch} linear layer with both "
                               f"lora_A and lora_B (found {sorted(ab)})")
        a, b = ab["lora_A"], ab["lora_B"]
        rank = int(_pattern(hf_cfg.get("rank_pattern") or {}, hf, r0))
        alpha = float(_pattern(hf_cfg.get("alpha_pattern") or {}, hf, alpha0))
        rows = b.shape[0] // len(natives)
        for j, native in enumerate(natives):
            part = b[j * rows:(j + 1) * rows]
            lin = modules.get(native)
            if lin is None or a.shape != (rank, lin.in_features) or part.shape != (lin.out_features, rank):
                raise LMStackError(
                    f"{folder / PEFT_WEIGHTS}: {hf!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                    f"this model expects rank {rank} (rank_pattern / r) and a layer of "
                    f"{getattr(lin, 'in_features', '?')} -> {getattr(lin, 'out_features', '?')} features")
            if native.rsplit(".", 1)[1] not in targets:
                if part.any():
                    raise LMStackError(f"{folder / PEFT_WEIGHTS}: {hf!r} updates {native}, which is not among "
                                       f"the adapter's targets {sorted(targets)}")
                continue
            plan[native] = (a, part, alpha)
    if not plan:
        raise LMStackError(f"{folder / PEFT_WEIGHTS}: no LoRA tensors")
    if ours is not None:
        cfg = config_from_dict(PEFTConfig, ours["peft"])
    else:
        cfg = PEFTConfig(method="lora", r=r0, alpha=alpha0, dropout=float(hf_cfg.get("lora_dropout", 0.0)),
                         targets=sorted({n.rsplit(".", 1)[1] for n in plan}, key=ALL_LINEARS.index))
    return cfg, plan
