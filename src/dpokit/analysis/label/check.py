"""``dpokit judge-check --data labels.jsonl``: a judge against the labels a person gave with ``dpokit label``.

Every pair the person decided (``a`` or ``b``) is judged in both orders, ``a`` first, by the judge of each
template (through the judgment cache, as ``judge-check`` on preference pairs); ties and skips are not
asked. :func:`dpokit.judges.agreement.human_agreement` gives the raw agreement (Wilson's interval),
Cohen's kappa (bootstrap interval) and the counts left out; position consistency and bias come from
:func:`dpokit.judges.stats.win_stats` as in every judge report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dpokit.analysis.label.store import HumanLabel, read_labels
from dpokit.errors import DataError
from dpokit.judges.agreement import OUTCOME_AS_CHOICE, human_agreement
from dpokit.judges.base import Judge, PairJudgment
from dpokit.judges.stats import win_stats

if TYPE_CHECKING:
    from dpokit.analysis.winrate import JudgeCheckJob

Log = Callable[[str], None]
CHUNK = 16  # pairs per judge call: the progress advances one chunk at a time
BOOTSTRAP_SAMPLES = 2000
INTERVALS_NOTE = (
    "n: pairs the person decided (a or b) whose judgment could be read; the person's ties and skips and unreadable "
    "judgments are left out and counted; a judge's tie on a decided pair counts as a disagreement. Agreement: "
    "Wilson score interval (analytic). κ: percentile bootstrap over the pairs ({samples} resamples); wilson-p_o = "
    "Wilson's interval of the agreement carried through κ at the chance agreement, where the bootstrap has no width."
)


BothOrders = list[tuple[PairJudgment, PairJudgment]]  # each pair's (forward, swapped) judgments


def _judge_labels(judge: Judge, labels: list[HumanLabel], advance: Callable[[int], None]) -> BothOrders:
    """Each decided label's pair judged as (A=a, B=b) and (A=b, B=a), :data:`CHUNK` pairs per call."""
    from dpokit.analysis.winrate import judge_both_orders

    pairs: BothOrders = []
    for start in range(0, len(labels), CHUNK):
        chunk = labels[start : start + CHUNK]
        pairs += judge_both_orders(judge, [x.prompt for x in chunk], [x.a for x in chunk], [x.b for x in chunk])
        advance(len(chunk))
    return pairs


def human_judge_check(job: JudgeCheckJob, log: Log | None = None) -> dict[str, Any]:
    """The judge's agreement with the human labels in ``job.data``, per template (see the module docstring)."""
    from dpokit.analysis.winrate import WinrateJob, check_readable, template_judges
    from dpokit.judges import JudgmentCache
    from dpokit.training.tracking import progress_bar

    log = log or (lambda line: None)
    labels, warnings = read_labels(job.data)
    for warning in warnings:
        log(f"warning: {warning}")
    labels = labels[: job.limit] if job.limit is not None else labels
    if not labels:
        raise DataError(f"{job.data}: no labels yet: label some pairs with dpokit label first")
    decided = [label for label in labels if label.choice in ("a", "b")]
    judges = template_judges(
        WinrateJob(models=[], judge=job.judge, templates=job.templates, load=job.load), JudgmentCache(job.cache)
    )
    judged: dict[str, tuple[Judge, BothOrders]] = {}
    total = len(decided) * len(judges)
    with progress_bar(total, enabled=job.progress, desc="judge-check", line_every=max(CHUNK, total // 20)) as bar:
        for template, judge in judges.items():
            bar.set_postfix(template=template)
            judged[template] = (judge, _judge_labels(judge, decided, bar.update))
    warnings += check_readable(job, judged, log) if decided else []
    results = []
    for template, (_, pairs) in judged.items():
        stats, outcomes = win_stats(pairs, list(range(len(pairs))), inconsistent=job.inconsistent, ci="wilson")
        by_id = {label.id: OUTCOME_AS_CHOICE[o] for label, o in zip(decided, outcomes, strict=True)}
        judge_outcomes = [by_id.get(label.id, "unparseable") for label in labels]  # ties and skips were not asked
        agreement = human_agreement([x.choice for x in labels], judge_outcomes, bootstrap_samples=BOOTSTRAP_SAMPLES)
        position = {k: v for k, v in stats.to_dict().items() if k in ("position_consistency", "position_bias")}
        results.append({"template": template, **agreement.to_dict(), **position})
    return {
        "judge": job.judge,
        "data": job.data,
        "human": True,
        "num_labels": len(labels),
        "results": results,
        "intervals": INTERVALS_NOTE.format(samples=BOOTSTRAP_SAMPLES),
        "warnings": warnings,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def human_check_markdown(report: dict[str, Any]) -> str:
    """The table of :func:`human_judge_check`: one row per template."""
    first = report["results"][0] if report["results"] else {}
    lines = [
        f"judge {report['judge']} against {report['num_labels']} human labels of {report['data']} "
        f"(left out: {first.get('human_ties', 0)} ties, {first.get('human_skips', 0)} skips)",
        "",
        "| template | n | agreement [95% CI] | Cohen's κ [95% CI] | κ interval | judge ties | unreadable "
        "| human prefers a | judge prefers a | position bias |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        agreement = f"{_fmt(r['agreement'])} [{_fmt(r['agreement_ci_low'])}, {_fmt(r['agreement_ci_high'])}]"
        kappa = f"{_fmt(r['kappa'])} [{_fmt(r['kappa_ci_low'])}, {_fmt(r['kappa_ci_high'])}]"
        lines.append(
            f"| {r['template']} | {r['n']} | {agreement} | {kappa} | {r['kappa_ci_method']} | {r['judge_ties']} "
            f"| {r['judge_unparseable']} | {_fmt(r['human_a_rate'])} | {_fmt(r['judge_a_rate'])} "
            f"| {_fmt(r['position_bias'], 2)} |"
        )
    lines += ["", report["intervals"]]
    return "\n".join(lines) + "\n"
