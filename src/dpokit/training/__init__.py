"""The training engine: one loop for one process or many (see :mod:`dpokit.training.trainer`).

``from dpokit.training import run`` is the library's training entry point; it is imported on
first use so that importing a submodule (checkpoints, references) does not load the trainer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RunResult", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dpokit.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'dpokit.training' has no attribute {name!r}")
