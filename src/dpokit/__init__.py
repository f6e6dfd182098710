"""dpokit: Direct Preference Optimization and its relatives for causal language models.

The library's entry points: ``dpokit.config.load_config`` (a typed run configuration) and
``dpokit.training.run`` (train). Subpackages are imported on first use, so ``import dpokit`` is
instant and ``dpokit.training.run(...)`` works right after it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {"analysis", "config", "data", "errors", "generation", "logprobs", "losses", "models", "training"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"dpokit.{name}")
    raise AttributeError(f"module 'dpokit' has no attribute {name!r}")
