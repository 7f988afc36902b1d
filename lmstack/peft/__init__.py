"""Parameter-efficient fine-tuning by module swap: LoRA, QLoRA, prefix tuning, bottleneck adapters.

The frozen base keeps its checkpoint keys; see ``core.apply_peft``. Names are imported on
first use, so reading a ``PEFTConfig`` does not import torch.
"""

from lmstack.peft.config import ALL_LINEARS, PEFTConfig

_LAZY = {
    "AdapterLinear": "lmstack.peft.adapter", "LoRALinear": "lmstack.peft.lora",
    "PrefixAttention": "lmstack.peft.prefix",
    **{n: "lmstack.peft.core" for n in ("apply_peft", "base_loader", "describe_params", "load_adapter",
                                         "merge_and_unload", "merge_lora", "param_counts", "peft_disabled",
                                         "peft_state_dict", "save_adapter", "unmerge_lora")},
}
__all__ = ["ALL_LINEARS", "PEFTConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmstack.peft' has no attribute {name!r}")
