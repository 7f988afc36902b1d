"""lmstack: the whole LLM lifecycle on one model core.

``from lmstack import LLM`` is the one-object entry point (load, generate, stream, chat).
"""

__version__ = "0.1.0"

__all__ = ["LLM", "__version__"]


def __getattr__(name):
    # Lazy so `import lmstack` (and the CLI's --help) does not import torch.
    if name == "LLM":
        from lmstack.infer.llm import LLM

        return LLM
    raise AttributeError(f"module 'lmstack' has no attribute {name!r}")
