"""``ServeConfig``: every option of ``lmstack serve`` (the CLI flags are generated from it).

It extends ``EngineConfig``: the engine's fields (``max_slots``, ``max_seq_len``,
``token_budget``, ``prefill_chunk``, ``max_queue``), their defaults, checks and help text are
inherited, so ``--max-slots`` means the same here as in the engine. With ``upstream`` the
slots and the queue bound the requests relayed instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from lmstack.infer.engine_config import EngineConfig


@dataclass
class ServeConfig(EngineConfig):
    model: Optional[str] = field(default=None, metadata={"help": "preset, model folder or .gguf (default: the embedded SmolLM2-135M-Instruct); 'fake' for a deterministic load-test model"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=8000, metadata={"help": "port to bind (0: any free port)"})
    model_name: Optional[str] = field(default=None, metadata={"help": "model id reported by /v1/models (default: derived from --model)"})
    dtype: Optional[str] = field(default=None, metadata={"help": "float32 or bfloat16"})
    adapter: Optional[str] = field(default=None, metadata={"help": "a LoRA / PEFT adapter folder (lmstack.peft.save_adapter) to attach to the model"})
    threads: int = field(default=0, metadata={"help": "torch threads, set before the model loads (0: torch's default)"})
    api_keys: list[str] = field(default_factory=list, metadata={"help": "accepted API keys (none: no auth)"})
    rate_limit_rpm: float = field(default=0.0, metadata={"help": "requests per minute per API key (0: unlimited)"})
    request_timeout: float = field(default=600.0, metadata={"help": "per-request deadline in seconds (0: none)"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "largest request body accepted"})
    keepalive_s: float = field(default=10.0, metadata={"help": "SSE ping interval while a stream is idle"})
    watchdog_s: float = field(default=30.0, metadata={"help": "/health is 503 when the engine makes no progress this long"})
    drain_timeout: float = field(default=30.0, metadata={"help": "on SIGTERM, seconds to let in-flight requests finish"})
    request_log: Optional[str] = field(default=None, metadata={"help": "append one JSON line per request to this file"})
    log_prompts: bool = field(default=False, metadata={"help": "include prompts and outputs in the request log"})
    upstream: Optional[str] = field(default=None, metadata={"help": "front this OpenAI-compatible base URL (e.g. a vLLM server's http://host:8000/v1) instead of loading a model"})
    upstream_api_key: Optional[str] = field(default=None, metadata={"help": "API key sent to the upstream (Authorization: Bearer)"})
    upstream_model: Optional[str] = field(default=None, metadata={"help": "model name sent to the upstream (default: the client's)"})
    rag: Optional[str] = field(default=None, metadata={"help": "a RAG store (folder or postgresql:// URL): adds /v1/rag/search and /v1/rag/chat/completions"})
    embeddings: bool = field(default=True, metadata={"help": "serve /v1/embeddings with the embedded encoder"})

    def engine(self) -> EngineConfig:
        """The engine's part of this config."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)})
