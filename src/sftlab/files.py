"""Where sftlab keeps its files.

    cache_root()          $SFTLAB_CACHE, else ~/.cache/sftlab: prepared examples, converted GGUF models
"""

from __future__ import annotations

import os


def cache_root() -> str:
    return os.environ.get("SFTLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sftlab")
