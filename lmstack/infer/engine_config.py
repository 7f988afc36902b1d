"""``EngineConfig``: the continuous-batching engine's limits, in a module without torch, so
the CLI (``lmstack serve --help``) builds its flags without importing it. ``ServeConfig``
extends it; ``lmstack.infer.engine`` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.errors import ConfigError


@dataclass
class EngineConfig:
    max_slots: int = field(default=16, metadata={"help": "sequences decoded together (KV cache rows)"})
    max_seq_len: int = field(default=2048, metadata={"help": "prompt + output tokens per sequence (capped at the model's context)"})
    token_budget: int = field(default=256, metadata={"help": "most tokens fed to the model in one step"})
    prefill_chunk: int = field(default=128, metadata={"help": "most prompt tokens one sequence feeds per step"})
    max_queue: int = field(default=64, metadata={"help": "requests waiting for a slot; past it submit() raises QueueFull"})

    def __post_init__(self) -> None:
        cls = type(self).__name__  # ServeConfig extends this one: name the class the user wrote
        for name in ("max_slots", "max_seq_len", "token_budget", "prefill_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{cls}.{name}: got {v!r}, expected an integer >= 1")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ConfigError(f"{cls}.max_queue: got {self.max_queue!r}, expected an integer >= 0")
