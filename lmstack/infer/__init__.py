"""Inference: sampling, the generation loop, and the ``LLM`` entry point.

Names are imported on first use, so a torch-free module of this package (``engine_config``)
can be imported without torch.
"""

_LAZY = {"TokenEvent": "lmstack.infer.generate", "beam_search": "lmstack.infer.generate",
         "generate_ids": "lmstack.infer.generate", "stream_generate": "lmstack.infer.generate",
         "LLM": "lmstack.infer.llm", "SamplingParams": "lmstack.infer.sampling"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmstack.infer' has no attribute {name!r}")
