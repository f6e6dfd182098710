"""A judge's agreement with human labels: raw agreement and Cohen's kappa, each with a 95% interval.

Each labelled pair (a, b) carries the person's choice -- ``a``, ``b``, ``tie`` or ``skip`` -- and the
judge's outcome for it, judged in both orders (:func:`dpokit.judges.stats.pair_outcome`, read as a
verdict about ``a``): ``a``, ``b``, ``tie`` (the judge said tie, or contradicted itself across the two
orders) or ``unparseable``. As in the DPO paper's human study, only pairs the person decided are
compared: the person's ties and skips are left out and counted, and so are the pairs whose judgment
could not be read. A judge's tie on a pair the person decided counts as a disagreement (and is counted).

* **raw agreement** ``p_o`` = the share of compared pairs where the judge picked the person's choice;
  its 95% interval is Wilson's score interval on ``n`` (analytic).
* **Cohen's kappa** ``(p_o - p_e) / (1 - p_e)``, ``p_e`` the agreement expected by chance from the two
  raters' label frequencies (:func:`dpokit.judges.stats.cohen_kappa`); its 95% interval is a seeded
  percentile bootstrap that resamples the compared pairs (``kappa_ci_method = "bootstrap"``). Where the
  bootstrap has no width (a small sample in perfect agreement resamples to kappa = 1 every time), the
  interval is Wilson's interval of ``p_o`` carried through the kappa formula at the sample's ``p_e``
  (``kappa_ci_method = "wilson-p_o"``), which does not claim certainty that three pairs cannot give.

The report also gives each rater's rate of preferring ``a`` (a tie counts half): with ``a`` a model's
sample and ``b`` a baseline's, the human and judge win rates the paper puts side by side.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from dpokit.errors import ConfigError
from dpokit.judges.stats import cohen_kappa, percentile, wilson_interval

HUMAN_CHOICES = ("a", "b", "tie", "skip")
JUDGE_OUTCOMES = ("a", "b", "tie", "unparseable")
OUTCOME_AS_CHOICE = {"win": "a", "loss": "b", "tie": "tie", "unparseable": "unparseable"}  # stats' outcomes for x = a


@dataclass
class HumanAgreement:
    """A judge against human labels on the same pairs (see the module docstring for every field)."""

    labelled: int  # every labelled pair
    n: int  # pairs compared: the person chose a or b, the judge's outcome was readable
    human_ties: int
    human_skips: int
    judge_unparseable: int  # among the pairs the person decided
    judge_ties: int  # among the compared pairs (each a disagreement)
    agreement: float
    agreement_ci_low: float
    agreement_ci_high: float
    kappa: float
    kappa_ci_low: float
    kappa_ci_high: float
    kappa_ci_method: str
    human_a_rate: float  # over the compared pairs
    judge_a_rate: float  # over the compared pairs, a tie half
    agreement_ci_method: str = "wilson"

    def to_dict(self) -> dict[str, float | int | str | None]:
        """Fields as JSON values: NaN (nothing compared) becomes None."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def expected_agreement(first: Sequence[str], second: Sequence[str]) -> float:
    """``p_e``: the agreement two raters with these label frequencies reach by chance."""
    count_first, count_second = Counter(first), Counter(second)
    n = len(first)
    return sum(count_first[label] * count_second[label] for label in count_first) / (n * n) if n else math.nan


def kappa_bootstrap_interval(
    first: Sequence[str], second: Sequence[str], *, samples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of Cohen's kappa, resampling the rated items (pairs of labels) with replacement."""
    n = len(first)
    if n == 0:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    values = []
    for _ in range(samples):
        draw = [rng.randrange(n) for _ in range(n)]
        values.append(cohen_kappa([first[i] for i in draw], [second[i] for i in draw]))
    values.sort()
    tail = (1 - level) / 2
    return (percentile(values, tail), percentile(values, 1 - tail))


def kappa_interval(human: Sequence[str], judge: Sequence[str], *, samples: int = 2000, seed: int = 0) -> tuple[float, float, str]:
    """The 95% interval of kappa and its method: the bootstrap, or Wilson's interval of ``p_o`` mapped
    through ``(p_o - p_e) / (1 - p_e)`` where the bootstrap has no width (see the module docstring)."""
    low, high = kappa_bootstrap_interval(human, judge, samples=samples, seed=seed)
    if low != high:
        return low, high, "bootstrap"
    n = len(human)
    p_e = expected_agreement(human, judge)
    if p_e >= 1.0:  # one label only, from both raters: kappa is 1 by convention, and nothing bounds it
        return low, high, "bootstrap"
    matches = sum(h == j for h, j in zip(human, judge, strict=True))
    p_low, p_high = wilson_interval(matches, n)
    return (p_low - p_e) / (1 - p_e), (p_high - p_e) / (1 - p_e), "wilson-p_o"


def _a_rate(labels: Sequence[str]) -> float:
    return sum(1.0 if x == "a" else 0.5 if x == "tie" else 0.0 for x in labels) / len(labels) if labels else math.nan


def human_agreement(
    human: Sequence[str], judge: Sequence[str], *, bootstrap_samples: int = 2000, seed: int = 0
) -> HumanAgreement:
    """Agreement of ``judge`` outcomes (``a``/``b``/``tie``/``unparseable``) with ``human`` choices
    (``a``/``b``/``tie``/``skip``) on the same pairs, in the same order."""
    if len(human) != len(judge):
        raise ConfigError(f"agreement needs one judge outcome per human label: got {len(human)} labels, {len(judge)} outcomes")
    for values, allowed, who in ((human, HUMAN_CHOICES, "human choice"), (judge, JUDGE_OUTCOMES, "judge outcome")):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown {who} {unknown[0]!r}: expected one of {', '.join(allowed)}")
    decided = [(h, j) for h, j in zip(human, judge, strict=True) if h in ("a", "b")]
    compared = [(h, j) for h, j in decided if j != "unparseable"]
    people, judged = [h for h, _ in compared], [j for _, j in compared]
    matches = sum(h == j for h, j in compared)
    n = len(compared)
    agreement_low, agreement_high = wilson_interval(matches, n)
    kappa_low, kappa_high, method = kappa_interval(people, judged, samples=bootstrap_samples, seed=seed)
    return HumanAgreement(
        labelled=len(human),
        n=n,
        human_ties=sum(h == "tie" for h in human),
        human_skips=sum(h == "skip" for h in human),
        judge_unparseable=sum(j == "unparseable" for _, j in decided),
        judge_ties=sum(j == "tie" for j in judged),
        agreement=matches / n if n else math.nan,
        agreement_ci_low=agreement_low,
        agreement_ci_high=agreement_high,
        kappa=cohen_kappa(people, judged),
        kappa_ci_low=kappa_low,
        kappa_ci_high=kappa_high,
        kappa_ci_method=method,
        human_a_rate=_a_rate(people),
        judge_a_rate=_a_rate(judged),
    )
