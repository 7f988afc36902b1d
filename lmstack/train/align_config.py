"""Typed configs of the preference stages (``DPOConfig`` for the DPO family, ``KTOConfig``);
the recipes ``recipes/align/dpo-*.yaml`` and ``kto-*.yaml`` are saved instances. No torch import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmstack.errors import ConfigError
from lmstack.peft.config import PEFTConfig
from lmstack.train.config import LoopConfig

REFERENCE_FREE = ("simpo", "orpo")  # losses without a reference policy


@dataclass
class _PreferenceConfig(LoopConfig):
    """Fields the DPO family and KTO share: model, data, lengths, reference, PEFT."""

    out_dir: str = field(default="runs/dpo", metadata={"help": "run folder (checkpoints, metrics, adapter/final)"})
    model: str = field(default="", metadata={"help": "policy to train (empty: the embedded SmolLM2)"})
    max_len: int = field(default=512, metadata={"help": "tokens of prompt + completion"})
    max_prompt_len: int = field(default=256, metadata={"help": "the prompt keeps its last N tokens (0 = no limit)"})
    beta: float = field(default=0.1, metadata={"help": "strength of the KL tie to the reference (SimPO: reward scale)"})
    precompute_ref: bool = field(default=False, metadata={
        "help": "LoRA: compute the reference log-probs once before training instead of each step (full "
                "fine-tuning always does, unless ref_model is given)"})
    ref_model: str = field(default="", metadata={
        "help": "full fine-tuning: a separate reference model kept in memory (empty: the policy's starting "
                "weights, through log-probs computed before training)"})
    peft: PEFTConfig = field(default_factory=lambda: PEFTConfig(method="lora"))
    export_merged: bool = False
    lr: float = 5e-5
    min_lr: float = 5e-6
    weight_decay: float = 0.0
    batch_size: int = field(default=4, metadata={"help": "examples (pairs for DPO) per micro-batch per process"})
    eval_interval: int = 25

    def check(self) -> None:
        super().check()
        name = type(self).__name__
        self._range("max_len", 2, None, ">= 2")
        self._range("max_prompt_len", 0, self.max_len - 1, f">= 0 and < max_len ({self.max_len})")
        if not 0 < self.beta < float("inf"):
            raise ConfigError(f"{name}.beta: got {self.beta}, expected > 0")
        if self.ref_model and self.peft.method != "full":
            raise ConfigError(f"{name}.ref_model: got {self.ref_model!r} with peft.method {self.peft.method!r}; "
                              "a PEFT run's reference is its own base with the adapters off, so leave ref_model empty")


@dataclass
class DPOConfig(_PreferenceConfig):
    data: str = field(default="builtin:pref-train", metadata={"help": "preference JSONL or builtin:<name>"})
    val_data: str = field(default="builtin:pref-val", metadata={"help": "held-out preference JSONL ('' for none)"})
    loss: Literal["sigmoid", "robust", "hinge", "ipo", "simpo", "orpo"] = field(default="sigmoid", metadata={
        "help": "sigmoid (DPO; cDPO with label_smoothing), robust (rDPO), hinge (SLiC), ipo, simpo, orpo"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "assumed rate of flipped labels: sigmoid (conservative DPO), robust and simpo only"})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin gamma"})
    orpo_lambda: float = field(default=0.1, metadata={"help": "ORPO's weight of the odds-ratio term"})

    def check(self) -> None:
        super().check()
        if self.loss not in ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo"):
            raise ConfigError(f"DPOConfig.loss: got {self.loss!r}, expected sigmoid, robust, hinge, ipo, simpo or orpo")
        high = 0.5 if self.loss == "robust" else 1.0
        if not 0 <= self.label_smoothing < high:
            raise ConfigError(f"DPOConfig.label_smoothing: got {self.label_smoothing}, expected in [0, {high})")
        if self.label_smoothing and self.loss not in ("sigmoid", "robust", "simpo"):
            raise ConfigError(f"DPOConfig.label_smoothing: got {self.label_smoothing} with loss {self.loss!r}, "
                              "which has none; expected 0 (or loss sigmoid, robust or simpo)")
        self._range("simpo_gamma", 0, None, ">= 0")
        self._range("orpo_lambda", 0, None, ">= 0")
        if self.ref_model and self.loss in REFERENCE_FREE:
            raise ConfigError(f"DPOConfig.ref_model: loss {self.loss!r} uses no reference model; leave it empty")


@dataclass
class KTOConfig(_PreferenceConfig):
    out_dir: str = field(default="runs/kto", metadata={"help": "run folder (checkpoints, metrics, adapter/final)"})
    data: str = field(default="builtin:kto-train", metadata={
        "help": "unpaired JSONL (prompt, completion, label) or builtin:<name>"})
    val_data: str = field(default="builtin:kto-val", metadata={"help": "held-out unpaired JSONL ('' for none)"})
    desirable_weight: float = field(default=1.0, metadata={"help": "lambda_D, weight of desirable examples"})
    undesirable_weight: float = field(default=1.0, metadata={"help": "lambda_U, weight of undesirable examples"})
    batch_size: int = field(default=8, metadata={
        "help": "examples per micro-batch per process (>= 2: the KL estimate pairs each prompt with another "
                "example's completion)"})

    def check(self) -> None:
        super().check()
        self._range("batch_size", 2, None, ">= 2 (the KL reference point needs mismatched pairs within a batch)")
        self._range("desirable_weight", 0, None, ">= 0")
        self._range("undesirable_weight", 0, None, ">= 0")
        if not (self.desirable_weight or self.undesirable_weight):
            raise ConfigError("KTOConfig: desirable_weight and undesirable_weight are both 0; nothing would train")
