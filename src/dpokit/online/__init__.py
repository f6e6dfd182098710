"""Online and self-labelling DPO: the policy samples, a judge (or the policy itself) labels, the trainer learns.

:func:`run_online` is ``dpokit online``; :mod:`dpokit.online.rounds` holds the loop, the other modules
one concern each (prompts, pairs, the round files, labelling, per-round metrics).
"""

from dpokit.online.rounds import OnlineResult, online_config, run_online

__all__ = ["OnlineResult", "online_config", "run_online"]
