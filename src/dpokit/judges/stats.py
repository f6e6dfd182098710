"""Win rates a user can trust: both orders, position bias, confidence intervals, agreement.

**Both orders.** Every pair (x, y) is judged as (A=x, B=y) and as (A=y, B=x). Reading each order as a
verdict about x -- ``win``, ``loss`` or ``tie`` -- the pair's outcome is their common verdict when the
two agree. When they disagree the judge contradicted itself, and the pair counts as a ``tie``
(``inconsistent="tie"``, the default) or is decided by the mean probability
``(P1(x) + 1 - P2(y)) / 2`` (``inconsistent="average"``). A judgment that could not be read in either
order makes the pair ``unparseable``: counted, and left out of the win rate. A judge that always says
"A" gets every pair as a tie: position swapping cancels it.

* position consistency = the fraction of (readable) pairs whose two orders agree;
* position bias = P(first wins) - 0.5 over all readable single judgments (a tie counts half):
  +0.5 for a judge that always picks A, -0.5 for one that always picks B, 0 for a fair judge.

**Win rate** = (wins + ties / 2) / (wins + ties + losses); wins, ties and losses are reported beside it.

**95% confidence intervals**: Wilson's score interval, or a seeded percentile bootstrap that resamples
*prompts* (all samples of a prompt together, since they are not independent). The percentile bootstrap
cannot see past the data at a boundary: 48 prompts all won resample to 48 wins every time, an interval
of [1, 1] that claims certainty. Where the win rate is 0 or 1, or the bootstrap interval collapses to a
point, the interval is Wilson's on the number of prompts instead (48/48 -> [0.926, 1]) and
``ci_method`` says ``wilson`` (:func:`interval_for`).

**Length-controlled win rate** (AlpacaEval's LC, :func:`length_controlled`): judges tend to prefer the
longer response, so a model can win by writing more. Each judged pair's outcome (win 1, tie 0.5, loss 0)
is fitted by a logistic regression ``P(win) = sigmoid(theta + phi * tanh(d / sd(d)))`` on ``d`` = the
length of x minus the length of y in characters (its sd over the comparison's pairs); the
length-controlled win rate is the prediction at equal length, ``sigmoid(theta)``, and ``phi`` is the
fitted length effect (> 0: the longer response is preferred). Both come with a seeded percentile
bootstrap over prompts (the fit repeated on each resample). A small L2 term keeps the fit finite when
length separates wins from losses perfectly. Every comparison (one model at one temperature and
template against its baseline) gets its own fit: the intercept is the model term; prompt terms are not
fitted (one pair per prompt cannot separate a prompt's difficulty from noise) -- prompts enter through
the bootstrap.

**Agreement** between two judges (or templates) on the same pairs: the fraction of equal outcomes and
Cohen's kappa, ``(p_o - p_e) / (1 - p_e)``, p_e the agreement expected from each one's label frequencies.
"""

from __future__ import annotations

import functools
import math
import random
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dpokit.errors import ConfigError
from dpokit.judges.base import PairJudgment

Z95 = 1.959963984540054
OUTCOMES = ("win", "tie", "loss", "unparseable")
OUTCOME_SCORES = {"win": 1.0, "tie": 0.5, "loss": 0.0}
LC_L2 = 0.01  # the L2 penalty of the length-controlled fit, on theta and phi (a weak prior: finite under separation)
LC_MAX_STEP = 5.0  # Newton steps longer than this are shortened (separated data pull the coefficients far)
INCONSISTENT_POLICIES = ("tie", "average")


def _verdict_for_x(judgment: PairJudgment, x_is_a: bool) -> str | None:
    verdict = judgment.verdict
    if verdict is None:
        return None
    if verdict == "tie":
        return "tie"
    return "win" if (verdict == "A") == x_is_a else "loss"


def pair_outcome(forward: PairJudgment, swapped: PairJudgment, inconsistent: str = "tie") -> str:
    """The outcome for x of a pair judged as (A=x, B=y) (``forward``) and as (A=y, B=x) (``swapped``).

    >>> always_a = PairJudgment(1.0, "A")
    >>> pair_outcome(always_a, always_a)  # x wins in one order, loses in the other
    'tie'
    >>> pair_outcome(PairJudgment(0.9, ""), PairJudgment(0.2, ""))
    'win'
    >>> pair_outcome(PairJudgment(0.9, ""), PairJudgment(0.6, ""), inconsistent="average")  # (0.9 + 0.4) / 2
    'win'
    """
    if inconsistent not in INCONSISTENT_POLICIES:
        raise ConfigError(f"inconsistent must be one of {INCONSISTENT_POLICIES}, not {inconsistent!r}")
    first, second = _verdict_for_x(forward, True), _verdict_for_x(swapped, False)
    if first is None or second is None:
        return "unparseable"
    if first == second:
        return first
    if inconsistent == "tie":
        return "tie"
    mean = (forward.prob_a + 1.0 - swapped.prob_a) / 2
    return "win" if mean > 0.5 else "loss" if mean < 0.5 else "tie"


def win_rate(outcomes: Sequence[str]) -> float:
    """(wins + ties / 2) / (wins + ties + losses); NaN when nothing was judged."""
    counts = Counter(outcomes)
    n = counts["win"] + counts["tie"] + counts["loss"]
    return (counts["win"] + 0.5 * counts["tie"]) / n if n else float("nan")


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``successes / n`` (ties may make successes fractional).

    >>> [round(v, 4) for v in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    """
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At p = 0 (p = 1) the bound is 0 (1) exactly; rounding would leave 1e-17 or 1 - 1e-16.
    low = 0.0 if successes <= 0 else max(0.0, center - half)
    high = 1.0 if successes >= n else min(1.0, center + half)
    return (low, high)


@functools.lru_cache(maxsize=64)
def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``p`` > 0.5) of Student's t distribution with ``df`` degrees of freedom: the CDF
    integrated by Simpson's rule from 0, the quantile found by bisection.

    >>> round(student_t_quantile(0.975, 2), 3), round(student_t_quantile(0.975, 10), 3)
    (4.303, 2.228)
    """
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, steps: int = 2000) -> float:
        h = x / steps
        density = [math.exp(log_norm - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(steps + 1)]
        return 0.5 + h / 3 * (density[0] + density[-1] + 4 * sum(density[1:-1:2]) + 2 * sum(density[2:-1:2]))

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, high * 2
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
    return (low + high) / 2


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of ``values`` (one per seed) with its Student-t interval (NaN bounds for a single value).

    >>> {k: round(v, 3) for k, v in t_interval([1.0, 2.0, 3.0]).items()}
    {'mean': 2.0, 'ci_low': -0.484, 'ci_high': 4.484}
    """
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci_low": float("nan"), "ci_high": float("nan")}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_quantile(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of sorted values."""
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def bootstrap_interval(
    groups: Sequence[Sequence[str]], *, samples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the win rate, resampling ``groups`` (one per prompt) with replacement.

    Two prompts, one won and one lost: a resample holds (win, win), (win, loss), (loss, win) or
    (loss, loss), so the win rate is 1, 0.5 or 0 with probabilities 1/4, 1/2, 1/4 and the 95% interval
    is (0, 1)::

        >>> bootstrap_interval([["win"], ["loss"]], samples=4000)
        (0.0, 1.0)
    """
    usable = [[o for o in group if o != "unparseable"] for group in groups]
    usable = [group for group in usable if group]
    if not usable:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    scores = [(sum(1.0 if o == "win" else 0.5 if o == "tie" else 0.0 for o in g), len(g)) for g in usable]
    values = []
    for _ in range(samples):
        draw = [scores[rng.randrange(len(scores))] for _ in scores]
        values.append(sum(s for s, _ in draw) / sum(n for _, n in draw))
    values.sort()
    tail = (1 - level) / 2
    return (percentile(values, tail), percentile(values, 1 - tail))


def interval_for(
    groups: Sequence[Sequence[str]], *, ci: str = "bootstrap", samples: int = 2000, seed: int = 0
) -> tuple[float, float, str]:
    """The 95% interval of the win rate of ``groups`` (the outcomes of each prompt) and the method that gave it.

    ``ci="wilson"``: Wilson's interval over the judged pairs. ``ci="bootstrap"``: the prompt bootstrap,
    unless the win rate is 0 or 1 or the bootstrap interval has no width; then Wilson's interval with
    ``n`` = the number of prompts (the bootstrap's unit) and the win rate's share of them as successes.
    """
    outcomes = [o for group in groups for o in group]
    counts = Counter(outcomes)
    judged = counts["win"] + counts["tie"] + counts["loss"]
    if ci == "wilson":
        return (*wilson_interval(counts["win"] + 0.5 * counts["tie"], judged), "wilson")
    low, high = bootstrap_interval(groups, samples=samples, seed=seed)
    rate = win_rate(outcomes)
    if judged and (rate in (0.0, 1.0) or low == high):
        prompts = sum(1 for group in groups if any(o != "unparseable" for o in group))
        return (*wilson_interval(rate * prompts, prompts), "wilson")
    return low, high, "bootstrap"


# ------------------------------------------------------------------------------- length control


def fit_length_logistic(
    scores: np.ndarray, feature: np.ndarray, weights: np.ndarray, *, l2: float = LC_L2, iterations: int = 100
) -> np.ndarray:
    """``(theta, phi)`` of ``P(win) = sigmoid(theta + phi * feature)`` fitted to ``scores`` (targets in
    [0, 1]; a tie is 0.5) by Newton's method on the weighted log-likelihood minus ``l2 / 2 * (theta^2 +
    phi^2)``. ``weights`` has one row of per-pair weights per fit (a bootstrap resample's counts); the fits
    run side by side and the result has one ``(theta, phi)`` row per weight row.

    Three pairs, weights 1, outcomes independent of the feature's sign (win at -1, loss at 0, win at 1):
    phi is 0 by symmetry and theta solves ``2 - 3 * sigmoid(theta) = 0.01 * theta``::

        >>> theta, phi = fit_length_logistic(np.array([1.0, 0.0, 1.0]), np.array([-1.0, 0.0, 1.0]), np.ones((1, 3)))[0]
        >>> round(float(theta), 4), round(float(phi), 4)
        (0.6829, 0.0)
    """
    coef = np.zeros((weights.shape[0], 2))
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(coef[:, :1] + coef[:, 1:] * feature)))
        residual = weights * (scores - p)
        g0 = residual.sum(axis=1) - l2 * coef[:, 0]
        g1 = (residual * feature).sum(axis=1) - l2 * coef[:, 1]
        h = weights * p * (1 - p)
        h00, h01, h11 = h.sum(axis=1) + l2, (h * feature).sum(axis=1), (h * feature * feature).sum(axis=1) + l2
        det = h00 * h11 - h01 * h01
        step = np.stack([(h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det], axis=1)
        length = np.linalg.norm(step, axis=1, keepdims=True)
        coef += step * np.minimum(1.0, LC_MAX_STEP / np.maximum(length, 1e-300))
        if float(length.max()) < 1e-10:
            break
    return coef


@dataclass
class LengthControl:
    """The length-controlled win rate of one comparison and the fitted length effect, each with its 95%
    interval; ``length_sd``: the sd of the length differences (characters) the feature is scaled by."""

    lc_win_rate: float
    lc_ci_low: float
    lc_ci_high: float
    lc_ci_method: str
    length_effect: float
    length_effect_ci_low: float
    length_effect_ci_high: float
    length_sd: float


def length_controlled(
    outcomes: Sequence[str],
    length_differences: Sequence[float],
    groups: Sequence[Hashable],
    *,
    samples: int = 2000,
    seed: int = 0,
    ci: str = "bootstrap",
    chunk: int = 250,
) -> LengthControl:
    """The win rate at equal length (see the module docstring) of pairs with these ``outcomes`` (for x),
    ``length_differences`` (len x - len y) and ``groups`` (each pair's prompt; the bootstrap resamples
    prompts). Unparseable pairs are left out. Where every outcome is the same, length explains nothing:
    the length-controlled win rate is the raw one with the raw one's interval (:func:`interval_for` with
    ``ci``), the effect 0 (no interval).

    Worked example: the longer response always wins, and x is the longer one in 6 of 8 pairs. The raw
    win rate is 0.75, all of it length; at equal length, the fit says, neither side is preferred (0.51:
    the L2 term, not the data, holds the fit a little off 0.5)::

        >>> outcomes = ["win"] * 6 + ["loss"] * 2
        >>> lengths = [60, 50, 40, 30, 20, 10, -10, -20]
        >>> win_rate(outcomes), round(length_controlled(outcomes, lengths, range(8)).lc_win_rate, 2)
        (0.75, 0.51)

    The same 6 wins and 2 losses where length does not decide (wins and losses alike on both sides of
    equal length): the controlled rate stays with the raw one, and the length effect is 0::

        >>> lc = length_controlled(["win"] * 6 + ["loss"] * 2, [-30, -20, -10, 10, 20, 30, -15, 15], range(8))
        >>> round(lc.lc_win_rate, 2), round(lc.length_effect, 6)
        (0.75, 0.0)
    """
    kept = [
        (OUTCOME_SCORES[o], float(d), g)
        for o, d, g in zip(outcomes, length_differences, groups, strict=True)
        if o in OUTCOME_SCORES
    ]
    if not kept:
        nan = float("nan")
        return LengthControl(nan, nan, nan, "none", nan, nan, nan, nan)
    scores = np.array([s for s, _, _ in kept])
    differences = np.array([d for _, d, _ in kept])
    sd = float(differences.std(ddof=1)) if len(kept) > 1 else 0.0
    feature = np.tanh(differences / sd) if sd > 0 else np.zeros_like(differences)
    if np.all(scores == scores[0]):
        by_group: dict[Hashable, list[str]] = {}
        for outcome, group in zip(outcomes, groups, strict=True):
            by_group.setdefault(group, []).append(outcome)
        low, high, method = interval_for(list(by_group.values()), ci=ci, samples=samples, seed=seed)
        return LengthControl(float(scores[0]), low, high, method, 0.0, float("nan"), float("nan"), sd)
    theta, phi = fit_length_logistic(scores, feature, np.ones((1, len(kept))))[0]
    names = list(dict.fromkeys(g for _, _, g in kept))
    index = {name: i for i, name in enumerate(names)}
    pair_group = np.array([index[g] for _, _, g in kept])
    rng = np.random.default_rng(seed)
    fits = []
    for start in range(0, samples, chunk):
        counts = rng.multinomial(len(names), np.full(len(names), 1.0 / len(names)), size=min(chunk, samples - start))
        fits.append(fit_length_logistic(scores, feature, counts[:, pair_group].astype(float)))
    coefs = np.concatenate(fits)
    rates = 1.0 / (1.0 + np.exp(-coefs[:, 0]))
    rate_low, rate_high = np.percentile(rates, [2.5, 97.5])
    effect_low, effect_high = np.percentile(coefs[:, 1], [2.5, 97.5])
    return LengthControl(
        lc_win_rate=float(1.0 / (1.0 + np.exp(-theta))),
        lc_ci_low=float(rate_low),
        lc_ci_high=float(rate_high),
        lc_ci_method="bootstrap",
        length_effect=float(phi),
        length_effect_ci_low=float(effect_low),
        length_effect_ci_high=float(effect_high),
        length_sd=sd,
    )


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels on the same items.

    10 items, A/B labels: both A 4 times, both B 3 times, (A, B) twice, (B, A) once. Then
    p_o = 7/10, rater 1 says A 6/10 and rater 2 5/10, p_e = 0.6*0.5 + 0.4*0.5 = 0.5, kappa = 0.2/0.5::

        >>> round(cohen_kappa(list("AAAABBBAAB"), list("AAAABBBBBA")), 6)
        0.4
    """
    if len(first) != len(second):
        raise ConfigError(f"kappa needs the same items rated twice: got {len(first)} and {len(second)} labels")
    n = len(first)
    if n == 0:
        return float("nan")
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    count_a, count_b = Counter(first), Counter(second)
    expected = sum(count_a[label] * count_b[label] for label in count_a) / (n * n)
    if expected == 1.0:
        return 1.0 if observed == 1.0 else float("nan")
    return (observed - expected) / (1 - expected)


@dataclass
class WinStats:
    """Everything reported for one comparison."""

    n: int
    wins: int
    ties: int
    losses: int
    unparseable: int
    win_rate: float
    ci_low: float
    ci_high: float
    ci_method: str
    position_consistency: float
    position_bias: float
    length_control: LengthControl | None = None  # when the pairs' lengths were given

    def to_dict(self) -> dict[str, float | int | str | None]:
        """The statistics as one flat mapping (NaN as None); the length control's fields join it when present."""
        fields = {k: v for k, v in asdict(self).items() if k != "length_control"}
        if self.length_control is not None:
            fields.update(asdict(self.length_control))
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in fields.items()}


def _position_stats(pairs: Sequence[tuple[PairJudgment, PairJudgment]]) -> tuple[float, float]:
    """(position consistency, position bias) of judgments in both orders."""
    consistent = readable = 0
    first_points: list[float] = []
    for forward, swapped in pairs:
        for judgment in (forward, swapped):
            verdict = judgment.verdict
            if verdict is not None:
                first_points.append(1.0 if verdict == "A" else 0.5 if verdict == "tie" else 0.0)
        a, b = _verdict_for_x(forward, True), _verdict_for_x(swapped, False)
        if a is not None and b is not None:
            readable += 1
            consistent += a == b
    consistency = consistent / readable if readable else float("nan")
    bias = sum(first_points) / len(first_points) - 0.5 if first_points else float("nan")
    return consistency, bias


def win_stats(
    pairs: Sequence[tuple[PairJudgment, PairJudgment]],
    groups: Sequence[Hashable],
    *,
    inconsistent: str = "tie",
    ci: str = "bootstrap",
    bootstrap_samples: int = 2000,
    seed: int = 0,
    length_differences: Sequence[float] | None = None,
) -> tuple[WinStats, list[str]]:
    """Statistics of pairs judged in both orders (``(forward, swapped)`` each); ``groups[i]`` names the
    prompt of pair i (the bootstrap resamples prompts). Returns the stats and each pair's outcome.
    ``ci_method`` is the interval actually reported (:func:`interval_for`: a degenerate bootstrap gives way
    to Wilson's). With ``length_differences`` (len x - len y of each pair) the stats carry the
    length-controlled win rate (:func:`length_controlled`, bootstrapped with the same samples and seed)."""
    if ci not in ("bootstrap", "wilson"):
        raise ConfigError(f"ci must be bootstrap or wilson, not {ci!r}")
    outcomes = [pair_outcome(f, s, inconsistent) for f, s in pairs]
    counts = Counter(outcomes)
    by_group: dict[Hashable, list[str]] = {}
    for group, outcome in zip(groups, outcomes, strict=True):
        by_group.setdefault(group, []).append(outcome)
    low, high, method = interval_for(list(by_group.values()), ci=ci, samples=bootstrap_samples, seed=seed)
    consistency, bias = _position_stats(pairs)
    stats = WinStats(
        n=len(outcomes),
        wins=counts["win"],
        ties=counts["tie"],
        losses=counts["loss"],
        unparseable=counts["unparseable"],
        win_rate=win_rate(outcomes),
        ci_low=low,
        ci_high=high,
        ci_method=method,
        position_consistency=consistency,
        position_bias=bias,
    )
    if length_differences is not None:
        stats.length_control = length_controlled(
            outcomes, length_differences, groups, samples=bootstrap_samples, seed=seed, ci=ci
        )
    return stats, outcomes


def agreement(first: Sequence[str], second: Sequence[str]) -> dict[str, float | int]:
    """Pairwise agreement and Cohen's kappa of two outcome lists, over the items both could judge."""
    both = [(a, b) for a, b in zip(first, second, strict=True) if a != "unparseable" and b != "unparseable"]
    if not both:
        return {"n": 0, "agreement": float("nan"), "kappa": float("nan")}
    left, right = [a for a, _ in both], [b for _, b in both]
    return {"n": len(both), "agreement": sum(a == b for a, b in both) / len(both), "kappa": cohen_kappa(left, right)}
