"""``ServeConfig``: every option of ``lmstack serve`` (the CLI flags are generated from it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ServeConfig:
    model: Optional[str] = field(default=None, metadata={"help": "preset, model folder or .gguf (default: the embedded SmolLM2-135M-Instruct); 'fake' for a deterministic load-test model"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=8000, metadata={"help": "port to bind (0: any free port)"})
    model_name: Optional[str] = field(default=None, metadata={"help": "model id reported by /v1/models (default: derived from --model)"})
    dtype: Optional[str] = field(default=None, metadata={"help": "float32 or bfloat16"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    max_slots: int = field(default=16, metadata={"help": "sequences decoded together"})
    max_seq_len: int = field(default=2048, metadata={"help": "prompt + output tokens per sequence"})
    token_budget: int = field(default=256, metadata={"help": "tokens per engine step"})
    prefill_chunk: int = field(default=128, metadata={"help": "prompt tokens per sequence per step"})
    max_queue: int = field(default=64, metadata={"help": "requests waiting for a slot before 429s"})
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
    embeddings: bool = field(default=True, metadata={"help": "serve /v1/embeddings with the embedded encoder"})
