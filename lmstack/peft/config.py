"""``PEFTConfig``: which PEFT method to attach and its hyper-parameters (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmstack.errors import ConfigError

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class PEFTConfig:
    method: Literal["full", "lora", "qlora", "prefix", "adapter"] = "full"
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ALL_LINEARS))
    quant_bits: Literal["int8", "int4"] = "int4"
    group_size: int = 64
    quant_embedding: bool = field(default=True, metadata={
        "help": "QLoRA: also store the frozen embeddings quantised (token and learned positions; with tied "
                "embeddings that is the output projection too)"})
    keep_base_copy: bool = False
    n_prefix: int = 16
    adapter_size: int = 32

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"PEFTConfig.r: got {self.r}, expected a positive rank")
        unknown = sorted(set(self.targets) - set(ALL_LINEARS))
        if unknown:
            raise ConfigError(f"PEFTConfig.targets: got {unknown}, expected names among {ALL_LINEARS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"PEFTConfig.dropout: got {self.dropout}, expected 0 <= dropout < 1")
