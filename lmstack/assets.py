"""Files shipped inside installed packages (models, data), found without importing them.

Several asset-only packages import heavy or missing modules at import time, so their folder
is located through the import system's spec instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional


def package_dir(name: str) -> Optional[Path]:
    """The folder of installed package ``name`` (its first location), or None if absent."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def require_package_dir(name: str, requirement: str, what: str) -> Path:
    """``package_dir(name)``, or an error telling how to install ``requirement`` (a pip spec),
    which ``what`` (a model, an encoder) needs."""
    from lmstack.errors import LMStackError

    root = package_dir(name)
    if root is None:
        raise LMStackError(f"{what} needs the {requirement.split('=')[0]} package; install it with "
                           f"`pip install --no-deps {requirement}`")
    return root

