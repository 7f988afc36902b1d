"""``GRPOConfig``: the GRPO stage's typed config (``lmstack grpo``); YAML recipes under
``recipes/align/grpo-*.yaml`` are saved instances. No torch import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmstack.errors import ConfigError
from lmstack.peft.config import PEFTConfig
from lmstack.train.config import LoopConfig
from lmstack.train.rewards import RewardSpec


@dataclass
class GRPOConfig(LoopConfig):
    out_dir: str = "runs/grpo"
    model: str = field(default="", metadata={"help": "policy to train (empty: the embedded SmolLM2)"})
    data: str = field(default="builtin:tasks-train", metadata={
        "help": "prompt-only JSONL (TRL format; other columns reach the rewards) or builtin:<name>"})
    val_data: str = field(default="builtin:tasks-val", metadata={"help": "held-out prompts ('' for none)"})
    batch_size: int = field(default=4, metadata={"help": "prompts per step (each sampled num_generations times)"})
    num_generations: int = field(default=8, metadata={"help": "G: completions per prompt, one group"})
    max_prompt_len: int = field(default=256, metadata={"help": "prompt tokens kept (the last ones)"})
    max_completion_len: int = field(default=96, metadata={"help": "most tokens sampled per completion"})
    temperature: float = 1.0
    top_p: float = 1.0
    rewards: list[RewardSpec] = field(default_factory=lambda: [
        RewardSpec("exact_match"), RewardSpec("json_schema", 0.5), RewardSpec("unit_tests")])
    scale_rewards: Literal["group", "none"] = field(default="group", metadata={
        "help": "advantage = (r - group mean) / (group std + 1e-4) (GRPO), or r - group mean (Dr. GRPO)"})
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = field(default="grpo", metadata={
        "help": "grpo: mean over each completion's tokens, then over completions; bnpo: mean over all tokens; "
                "dr_grpo: sum over tokens / (completions x max_completion_len)"})
    epsilon: float = field(default=0.2, metadata={"help": "clip: ratio kept within [1 - epsilon, 1 + epsilon_high]"})
    epsilon_high: float = field(default=0.0, metadata={"help": "upper clip (0 = epsilon; DAPO uses 0.28)"})
    beta: float = field(default=0.0, metadata={"help": "KL(pi || pi_ref) weight, k3 estimator; 0 = no reference pass"})
    num_iterations: int = field(default=1, metadata={"help": "optimizer updates per generation batch (mu)"})
    logp_batch: int = field(default=16, metadata={"help": "completions per forward/backward micro-batch"})
    peft: PEFTConfig = field(default_factory=lambda: PEFTConfig(method="lora"))
    val_max_prompts: int = field(default=0, metadata={"help": "held-out prompts measured (0 = all)"})
    measure: bool = field(default=True, metadata={"help": "greedy held-out accuracy before and after"})
    export_merged: bool = False
    lr: float = 5e-5
    min_lr: float = 5e-6
    warmup_steps: int = 0
    max_steps: int = 100
    eval_interval: int = 1000
    ckpt_interval: int = 25
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        # ``--rewards a b`` on the command line gives names: each becomes a term of weight 1
        self.rewards = [RewardSpec(r) if isinstance(r, str) else r for r in self.rewards]

    def check(self) -> None:
        super().check()
        if self.ckpt_interval % self.num_iterations:
            raise ConfigError(f"GRPOConfig.ckpt_interval: got {self.ckpt_interval}, expected a multiple of "
                              f"num_iterations ({self.num_iterations}), so checkpoints fall between generation batches")
        for name in ("num_generations", "max_prompt_len", "max_completion_len", "num_iterations", "logp_batch"):
            self._range(name, 1, None, "> 0")
        if self.num_generations < 2:
            raise ConfigError(f"GRPOConfig.num_generations: got {self.num_generations}, expected >= 2 "
                              "(a group of one has no baseline)")
        self._range("temperature", 1e-4, 100, "in (0, 100] (GRPO samples; greedy groups would be identical)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"GRPOConfig.top_p: got {self.top_p}, expected 0 < top_p <= 1")
        self._range("epsilon", 0, 1, "in [0, 1]")
        self._range("epsilon_high", 0, None, ">= 0 (0 = epsilon)")
        self._range("beta", 0, None, ">= 0")
        self._range("val_max_prompts", 0, None, ">= 0")
        if not self.rewards:
            raise ConfigError("GRPOConfig.rewards: got an empty list, expected at least one reward")
        for i, r in enumerate(self.rewards):
            if not isinstance(r, RewardSpec):
                raise ConfigError(f"GRPOConfig.rewards[{i}]: got {r!r}, expected name/weight/args")
            if not isinstance(r.weight, (int, float)) or r.weight != r.weight:
                raise ConfigError(f"GRPOConfig.rewards[{i}].weight: got {r.weight!r}, expected a number")
        if self.peft.method not in ("lora", "qlora", "full"):
            raise ConfigError(f"GRPOConfig.peft.method: got {self.peft.method!r}, expected lora, qlora or full")
        if self.beta > 0 and self.peft.method == "full":
            # the reference is the base under the adapters; full fine-tuning keeps no copy of it
            raise ConfigError(f"GRPOConfig.beta: got {self.beta} with peft.method full, expected 0 (the KL "
                              "reference is the model with its adapters passed through; use lora or qlora)")
