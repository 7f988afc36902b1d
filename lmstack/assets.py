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
