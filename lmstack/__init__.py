"""lmstack: the whole LLM lifecycle on one model core.

``from lmstack import LLM`` is the one-object entry point (load, generate, stream, chat).
"""

import os

__version__ = "0.1.0"

# Threads that wait for each other sleep instead of spinning. GNU OpenMP (torch's, and the
# decode kernels') spins at every barrier by default; on a machine whose cores other processes
# also use, a spinning thread waits out a scheduler time slice for a preempted sibling, and
# decoding ran 2-3x slower than with one thread (bench/threads.py). Only takes effect when
# lmstack is imported before torch; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["LLM", "__version__"]


def __getattr__(name):
    # Lazy so `import lmstack` (and the CLI's --help) does not import torch.
    if name == "LLM":
        from lmstack.infer.llm import LLM

        return LLM
    raise AttributeError(f"module 'lmstack' has no attribute {name!r}")
