"""The training engine: one loop for one process or many (see :mod:`dpokit.training.trainer`)."""

from dpokit.training.trainer import RunResult, run

__all__ = ["RunResult", "run"]
