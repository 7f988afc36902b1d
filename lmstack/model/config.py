"""``ModelConfig``: the closed set of switches that describes every supported decoder.

One dataclass covers the GPT-2 family (learned positions, LayerNorm, GELU MLP, biases), the
Llama / SmolLM / Mistral family (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases)
and Qwen2 (Llama plus q/k/v biases). ``arch`` only names the family for Hugging Face export;
the forward pass reads the switches, never the family name.

Deliberately left out: RoPE scaling variants (linear / NTK / llama3 / YaRN), mixture of
experts, parallel attention+MLP blocks (GPT-J/NeoX), ALiBi. Loading a checkpoint that needs
one of them is an ``UnsupportedError``, never a silently wrong model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from lmstack.errors import ConfigError

Arch = Literal["gpt2", "llama", "mistral", "qwen2"]


@dataclass
class ModelConfig:
    arch: Arch = "llama"
    vocab_size: int = 32000
    block_size: int = 2048  # maximum positions (context length)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # None -> n_head (MHA); 1 -> MQA; otherwise GQA
    n_embd: int = 768
    head_dim: Optional[int] = None  # None -> n_embd // n_head
    intermediate_size: Optional[int] = None  # None -> 4 * n_embd
    pos: Literal["learned", "rope", "sinusoidal", "none"] = "rope"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "swiglu"
    bias: bool = False  # biases on every linear and norm (GPT-2)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2)
    tie_embeddings: bool = True
    sliding_window: Optional[int] = None  # Mistral: each query sees the last `sliding_window` keys
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ConfigError(
                    f"ModelConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                    "set head_dim explicitly"
                )
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"ModelConfig: n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"ModelConfig: rotary positions need an even head_dim, got {self.head_dim}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ModelConfig.{name}: got {getattr(self, name)}, expected > 0")

    @property
    def n_rep(self) -> int:
        return self.n_head // self.n_kv_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        from lmstack.config import config_from_dict

        return config_from_dict(cls, d)

    def num_params(self) -> int:
        """Parameter count implied by the config (tied embeddings counted once)."""
        C, hd = self.n_embd, self.head_dim
        q = C * self.n_head * hd
        kv = 2 * C * self.n_kv_head * hd
        o = self.n_head * hd * C
        mlp = (3 if self.mlp == "swiglu" else 2) * C * self.intermediate_size
        norm = C * (2 if self.norm == "layernorm" and self.bias else 1)
        biases = 0
        if self.bias:
            biases += self.n_head * hd + 2 * self.n_kv_head * hd + C
            biases += self.intermediate_size * (2 if self.mlp == "swiglu" else 1) + C
        elif self.qkv_bias:
            biases += self.n_head * hd + 2 * self.n_kv_head * hd
        per_layer = q + kv + o + mlp + 2 * norm + biases
        total = self.n_layer * per_layer + norm + self.vocab_size * C
        if not self.tie_embeddings:
            total += self.vocab_size * C
        if self.pos == "learned":
            total += self.block_size * C
        return total


def _gpt2(**kw) -> ModelConfig:
    base = dict(arch="gpt2", pos="learned", norm="layernorm", mlp="gelu", bias=True,
                tie_embeddings=True, norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


def _llama(**kw) -> ModelConfig:
    base = dict(arch="llama", pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, callable] = {
    # Tiny shapes for tests: a forward pass takes milliseconds.
    "tiny-gpt2": lambda: _gpt2(vocab_size=320, block_size=128, n_layer=2, n_head=4, n_embd=64),
    "tiny-llama": lambda: _llama(vocab_size=320, block_size=128, n_layer=2, n_head=4, n_kv_head=2,
                                 n_embd=64, intermediate_size=128, norm_eps=1e-6),
    "tiny-mistral": lambda: _llama(arch="mistral", vocab_size=320, block_size=128, n_layer=2, n_head=4,
                                   n_kv_head=1, n_embd=64, intermediate_size=128, sliding_window=16,
                                   tie_embeddings=False),
    "tiny-qwen2": lambda: _llama(arch="qwen2", vocab_size=320, block_size=128, n_layer=2, n_head=4,
                                 n_kv_head=2, n_embd=64, intermediate_size=128, qkv_bias=True,
                                 norm_eps=1e-6, rope_theta=1e6),
    # About 10M parameters: the pre-training demo size.
    "llama-10m": lambda: _llama(vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_kv_head=2,
                                n_embd=288, intermediate_size=768),
    # Real shapes (random init): useful for benchmarks and memory planning.
    "gpt2-124m": lambda: _gpt2(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "smollm2-135m": lambda: _llama(vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3,
                                   n_embd=576, intermediate_size=1536, rope_theta=100000.0),
    "smollm2-360m": lambda: _llama(vocab_size=49152, block_size=8192, n_layer=32, n_head=15, n_kv_head=5,
                                   n_embd=960, intermediate_size=2560, rope_theta=100000.0),
    "llama-1b": lambda: _llama(vocab_size=128256, block_size=8192, n_layer=16, n_head=32, n_kv_head=8,
                               n_embd=2048, intermediate_size=8192, rope_theta=500000.0),
    "qwen2-0.5b": lambda: _llama(arch="qwen2", vocab_size=151936, block_size=32768, n_layer=24, n_head=14,
                                 n_kv_head=2, n_embd=896, intermediate_size=4864, qkv_bias=True,
                                 norm_eps=1e-6, rope_theta=1e6),
}


def preset(name: str) -> ModelConfig:
    """A fresh ``ModelConfig`` for a preset name (see ``PRESETS``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; presets are {sorted(PRESETS)}") from None
