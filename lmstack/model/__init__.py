"""The model core: one decoder transformer, its config, KV cache and checkpoint formats."""

from lmstack.model.config import PRESETS, ModelConfig, preset
from lmstack.model.kv_cache import KVCache
from lmstack.model.model import Transformer

__all__ = ["KVCache", "ModelConfig", "PRESETS", "Transformer", "preset"]
