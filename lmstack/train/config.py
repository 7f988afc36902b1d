"""Typed configs of the training stages (``PretrainConfig``, ``SFTConfig``); YAML recipes
under ``recipes/train/`` are saved instances. No torch import, so the CLI builds its flags cheaply."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from lmstack.errors import ConfigError
from lmstack.peft.config import PEFTConfig


@dataclass
class LoopConfig:
    """Fields every training stage shares (a stage's config adds its own)."""

    out_dir: str = field(default="runs/train", metadata={"help": "run folder (checkpoints, metrics, plots)"})
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "autocast compute dtype"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch per process"})
    grad_accum: int = field(default=0, metadata={"help": "micro-batches per step; 0 = from tokens_per_step"})
    tokens_per_step: int = field(default=0, metadata={
        "help": "target tokens per optimizer step, all processes (pretrain: an exact multiple of batch_size x "
                "processes x seq_len; sft: micro-batches are added until the step holds at least this many)"})
    max_steps: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = field(default=0.2, metadata={"help": "WSD: fraction of steps spent decaying"})
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    loss_chunk: int = field(default=4096, metadata={
        "help": "vocabulary rows per chunk of the fused output projection + loss (the tokens x vocab logits "
                "never exist; costs one more matmul in backward); 0 = one unfused projection"})
    compile: bool = False
    eval_interval: int = field(default=50, metadata={"help": "evaluate every N steps (and at the last)"})
    eval_batches: int = 8
    log_interval: int = field(default=1, metadata={
        "help": "write a metrics.jsonl record (and refresh the progress bar's numbers) every N steps; "
                "evaluations, skipped steps and the last step are always written"})
    ckpt_interval: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the last)"})
    keep_last: int = 2
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skips_in_a_row: int = field(default=10, metadata={
        "help": "on_nonfinite: skip stops the run after this many skipped steps in a row"})
    distributed: Literal["auto", "ddp", "fsdp"] = field(
        default="auto", metadata={"help": "strategy under torchrun (auto = ddp); ignored in one process"})
    peak_flops: float = field(default=0.0, metadata={"help": "for MFU; 0 = measured matmul peak (CPU) or table (GPU)"})
    progress: bool = True
    threads: int = field(default=0, metadata={"help": "CPU threads for torch and the kernels (0 = torch's default)"})

    def check(self) -> None:
        """Every field in its range, checked before anything loads (so ``--lr 1e39`` is one line,
        not an optimizer traceback minutes later)."""
        for name in ("batch_size", "max_steps", "eval_interval", "eval_batches", "log_interval", "ckpt_interval",
                     "max_skips_in_a_row"):
            self._range(name, 1, None, "> 0")
        for name in ("grad_accum", "tokens_per_step", "loss_chunk", "warmup_steps", "keep_last", "threads"):
            self._range(name, 0, None, ">= 0")
        if self.grad_accum and self.tokens_per_step:
            raise ConfigError(f"{type(self).__name__}: got grad_accum={self.grad_accum} and tokens_per_step="
                              f"{self.tokens_per_step}, expected only one of them (the other 0)")
        # AdamW moves every weight by about lr per step: above 1 it never trains, and near
        # float32's limit (3.4e38) the optimizer cannot even form its step size.
        if not 0 < self.lr <= 1:
            raise ConfigError(f"{type(self).__name__}.lr: got {self.lr}, expected 0 < lr <= 1")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{type(self).__name__}.min_lr: got {self.min_lr}, expected 0 <= min_lr <= lr ({self.lr})")
        self._range("weight_decay", 0, 1, "in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{type(self).__name__}.{name}: got {getattr(self, name)}, expected in [0, 1)")
        self._range("decay_fraction", 0, 1, "in [0, 1]")
        self._range("grad_clip", 0, None, ">= 0 (0 = no clipping)")
        self._range("peak_flops", 0, None, ">= 0 (0 = measured or from the table)")

    def _range(self, name: str, low: float, high: Optional[float], expected: str) -> None:
        """``low <= value <= high`` (``high`` None: no bound but finite); NaN fails too."""
        v = getattr(self, name)
        if not (low <= v and (v <= high if high is not None else math.isfinite(v))):
            raise ConfigError(f"{type(self).__name__}.{name}: got {v}, expected {expected}")


@dataclass
class PretrainConfig(LoopConfig):
    data: str = field(default="runs/data/offline-corpora",
                      metadata={"help": "token shards folder (lmstack data prepare)"})
    model: str = field(default="llama-10m", metadata={"help": "model preset to initialise"})
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 256
    sample_prompts: list[str] = field(default_factory=lambda: ["The", "Once upon a time"])
    sample_tokens: int = 40
    sample_temperature: float = field(default=0.8, metadata={"help": "0 = greedy samples"})

    def check(self) -> None:
        super().check()
        self._range("seq_len", 1, None, "> 0")
        self._range("sample_tokens", 0, None, ">= 0")
        self._range("sample_temperature", 0, None, ">= 0 (0 = greedy)")


@dataclass
class SFTConfig(LoopConfig):
    model: str = field(default="", metadata={"help": "model to fine-tune (empty: the embedded SmolLM2)"})
    data: str = field(default="builtin:instruct-train", metadata={"help": "JSONL file or builtin:<name>"})
    val_data: str = field(default="builtin:instruct-val", metadata={"help": "held-out JSONL ('' for none)"})
    max_len: int = 512
    packing: bool = False
    epochs: float = field(default=0.0, metadata={"help": "if > 0, sets max_steps to cover this many epochs"})
    peft: PEFTConfig = field(default_factory=lambda: PEFTConfig(method="lora"))
    measure: bool = field(default=False, metadata={"help": "held-out loss and exact match before and after"})
    measure_max_new_tokens: int = 48
    export_merged: bool = False

    def check(self) -> None:
        super().check()
        self._range("max_len", 1, None, "> 0")
        self._range("epochs", 0, None, ">= 0 (0 = max_steps decides)")
        self._range("measure_max_new_tokens", 1, None, "> 0")
