"""Preference objectives: DPO and its relatives as pure functions of log-probabilities.

Nothing here sees a model. Every loss takes summed sequence log-probabilities (and, where it
needs them, response lengths or per-token log-probs) and returns one loss per example.

Notation used in the docstrings, for an example with responses ranked best first:

* ``pi_k``  = log pi_theta(y_k | x), the summed log-prob of response k under the policy;
* ``ref_k`` = log pi_ref(y_k | x) under the frozen reference (0 in ``reference_free`` mode);
* ``rho_k`` = pi_k - ref_k, the *log-ratio*; for a pair ``rho_w`` (chosen) and ``rho_l`` (rejected);
* ``r_k``   = beta * rho_k, the implicit reward (DPO paper, section 5);
* ``h``     = rho_w - rho_l, the log-ratio margin, so ``beta * h = r_w - r_l``.

Two layers:

1. Plain functions that are the math and nothing else; read and test them alone:
   :mod:`~dpokit.losses.pairwise` (DPO's relatives, and the reference-free ORPO / CPO / SimPO /
   AlphaPO), :mod:`~dpokit.losses.listwise` (Plackett-Luce), :mod:`~dpokit.losses.unpaired` (KTO),
   :mod:`~dpokit.losses.likelihood` (SFT, unlikelihood).
2. :mod:`~dpokit.losses.objective`: one registry, :data:`LOSSES`, and :func:`build_objective`, which
   turns config terms into an :class:`Objective` that a trainer calls on :class:`LossInputs`.
"""

from __future__ import annotations

from dpokit.losses.likelihood import (
    sft_loss,
    unlikelihood_loss,
)
from dpokit.losses.listwise import (
    plackett_luce_loss,
)
from dpokit.losses.objective import (
    LOSSES,
    LossInputs,
    LossSpec,
    Objective,
    ObjectiveOutput,
    available_losses,
    build_objective,
)
from dpokit.losses.pairwise import (
    alphapo_loss,
    alphapo_rewards,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    cpo_loss,
    discopop_loss,
    exo_pair_loss,
    f_divergence_scores,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    orpo_loss,
    robust_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    simpo_loss,
    sppo_hard_loss,
)
from dpokit.losses.unpaired import (
    apo_zero_unpaired_loss,
    kto_loss,
)

__all__ = [
    "LossInputs",
    "ObjectiveOutput",
    "Objective",
    "LossSpec",
    "LOSSES",
    "available_losses",
    "build_objective",
    "sigmoid_loss",
    "robust_loss",
    "ipo_loss",
    "hinge_loss",
    "exo_pair_loss",
    "nca_pair_loss",
    "bco_pair_loss",
    "sppo_hard_loss",
    "apo_zero_loss",
    "apo_down_loss",
    "discopop_loss",
    "aot_loss",
    "aot_unpaired_loss",
    "sigmoid_norm_loss",
    "sft_loss",
    "unlikelihood_loss",
    "plackett_luce_loss",
    "orpo_loss",
    "cpo_loss",
    "simpo_loss",
    "alphapo_loss",
    "alphapo_rewards",
    "kto_loss",
    "apo_zero_unpaired_loss",
    "f_divergence_scores",
]
