"""Typed configs of reward-model training (``RMConfig``) and PPO (``PPOConfig``); the recipes
``recipes/align/rm-*.yaml`` and ``ppo-*.yaml`` are saved instances. No torch import."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.errors import ConfigError
from lmstack.peft.config import PEFTConfig
from lmstack.train.config import LoopConfig


@dataclass
class RMConfig(LoopConfig):
    out_dir: str = field(default="runs/rm", metadata={
        "help": "run folder; the model is saved to <out_dir>/reward_model"})
    model: str = field(default="", metadata={"help": "base model (empty: the embedded SmolLM2)"})
    data: str = field(default="builtin:pref-train", metadata={"help": "preference JSONL or builtin:<name>"})
    val_data: str = field(default="builtin:pref-val", metadata={"help": "held-out preference JSONL ('' for none)"})
    max_len: int = field(default=512, metadata={"help": "tokens of prompt + completion"})
    max_prompt_len: int = field(default=0, metadata={"help": "the prompt keeps its last N tokens (0 = no limit)"})
    margin: float = field(default=0.0, metadata={
        "help": "Bradley-Terry margin m: the loss is -log sigmoid(r_chosen - r_rejected - m)"})
    center_coef: float = field(default=0.0, metadata={
        "help": "weight of the mean squared reward (r_chosen + r_rejected)^2, which keeps rewards centred"})
    epochs: float = field(default=0.0, metadata={"help": "if > 0, sets max_steps to cover this many epochs of pairs"})
    peft: PEFTConfig = field(default_factory=lambda: PEFTConfig(method="lora"))

    def check(self) -> None:
        super().check()
        self._range("max_len", 2, None, ">= 2")
        self._range("max_prompt_len", 0, self.max_len - 1, f">= 0 and < max_len ({self.max_len})")
        self._range("margin", 0, None, ">= 0")
        self._range("center_coef", 0, None, ">= 0")
        self._range("epochs", 0, None, ">= 0 (0 = max_steps decides)")
        if self.tokens_per_step:
            raise ConfigError(f"RMConfig.tokens_per_step: got {self.tokens_per_step}, expected 0 (a reward-model "
                              "step counts pairs: batch_size x grad_accum)")
        if self.peft.method not in ("full", "lora", "qlora"):
            raise ConfigError(f"RMConfig.peft.method: got {self.peft.method!r}, expected full, lora or qlora "
                              "(the saved reward model is a native checkpoint or a LoRA adapter)")


@dataclass
class PPOConfig(LoopConfig):
    out_dir: str = field(default="runs/ppo", metadata={"help": "run folder (checkpoints, metrics, adapter/final)"})
    model: str = field(default="", metadata={"help": "policy to train (empty: the embedded SmolLM2)"})
    reward_model: str = field(default="runs/rm/reward_model", metadata={"help": "folder written by `lmstack rm`"})
    data: str = field(default="builtin:pref-train", metadata={
        "help": "prompts: any JSONL with a 'prompt' column, or builtin:<name> (repeated prompts are kept once)"})
    val_data: str = field(default="builtin:pref-val", metadata={"help": "held-out prompts ('' for none)"})
    max_prompt_len: int = 256
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = field(default=0, metadata={"help": "sampling top-k (0 = off)"})
    ppo_epochs: int = field(default=2, metadata={"help": "optimisation passes over each batch of rollouts"})
    mini_batches: int = field(default=1, metadata={"help": "mini-batches per pass (each is one optimizer step)"})
    gamma: float = field(default=1.0, metadata={"help": "discount of the GAE returns"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip epsilon"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip around the rollout's values"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    kl_coef: float = field(default=0.05, metadata={"help": "beta of the per-token KL penalty in the reward"})
    whiten_advantages: bool = True
    missing_eos_penalty: float = field(default=0.0, metadata={
        "help": "subtracted from the score of a completion that hit max_new_tokens without stopping (0 = off)"})
    eval_samples: int = field(default=0, metadata={"help": "held-out prompts scored at each evaluation (0 = all)"})
    peft: PEFTConfig = field(default_factory=lambda: PEFTConfig(method="lora"))
    export_merged: bool = field(default=False, metadata={"help": "also write final/ with the adapter merged"})

    def check(self) -> None:
        super().check()
        for name in ("max_prompt_len", "max_new_tokens", "ppo_epochs", "mini_batches"):
            self._range(name, 1, None, "> 0")
        self._range("top_k", 0, None, ">= 0")
        self._range("eval_samples", 0, None, ">= 0")
        self._range("temperature", 0, 100, "in (0, 100]")
        if self.temperature == 0:
            raise ConfigError("PPOConfig.temperature: got 0, expected > 0 (PPO's ratios need a sampling "
                              "distribution, not greedy decoding)")
        for name in ("gamma", "lam"):
            self._range(name, 0, 1, "in [0, 1]")
        for name in ("cliprange", "cliprange_value", "vf_coef", "kl_coef", "missing_eos_penalty"):
            self._range(name, 0, None, ">= 0")
        if self.mini_batches > self.batch_size:
            raise ConfigError(f"PPOConfig.mini_batches: got {self.mini_batches}, expected at most batch_size "
                              f"({self.batch_size}) so that each mini-batch holds a rollout")
        for name in ("grad_accum", "tokens_per_step"):
            if getattr(self, name):
                raise ConfigError(f"PPOConfig.{name}: got {getattr(self, name)}, expected 0 (a PPO step is one "
                                  "mini-batch of a rollout of batch_size prompts)")
        updates = self.ppo_epochs * self.mini_batches
        for name in ("max_steps", "ckpt_interval"):
            if getattr(self, name) % updates:
                raise ConfigError(f"PPOConfig.{name}: got {getattr(self, name)}, expected a multiple of ppo_epochs x "
                                  f"mini_batches = {updates} (the optimizer steps of one rollout), so that a "
                                  "checkpoint never falls inside a rollout's updates")
        if not self.reward_model:
            raise ConfigError("PPOConfig.reward_model: empty, expected the folder `lmstack rm` wrote")
        if self.peft.method not in ("lora", "qlora"):
            raise ConfigError(f"PPOConfig.peft.method: got {self.peft.method!r}, expected lora or qlora (the "
                              "reference policy is the same weights with the adapters disabled)")
