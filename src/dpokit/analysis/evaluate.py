"""``dpokit eval``: a policy as an implicit reward model, measured on preference data.

With r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (summed response log-probs), a preference pair
is *ranked correctly* when r(x, y_w) > r(x, y_l). ``dpokit eval`` reports, over a dataset,

* ``rewards/accuracies`` -- the fraction of pairs ranked correctly (preference accuracy),
* ``rewards/margins`` -- the mean r(x, y_w) - r(x, y_l),
* ``rewards/chosen`` / ``rewards/rejected`` -- the mean rewards,
* ``loss`` -- the mean of the configured objective (DPO's -log sigmoid(margin) by default),

using the same log-prob code and objective as training, so the numbers match the run's eval metrics.

Models are loaded by :func:`dpokit.models.load_policy` (a model directory, a LoRA adapter
directory -- policy = base + adapter; reference = base with the adapter switched off -- or a
directory written by ``dpokit train``). Settings left open in an :class:`EvalJob` come from the
training configuration (:func:`training_defaults`), so no default is repeated here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dpokit.errors import ConfigError
from dpokit.models import LoadOptions, load_policy, pad_id_of
from dpokit.scoring import check_batch_size, policy_runner, resolve_reference, training_defaults
from dpokit.training.parallel import ParallelPolicy
from dpokit.training.reference import NoReference, Reference
from dpokit.training.splits import Split
from dpokit.training.step import EvalResult, evaluate

# ------------------------------------------------------------------------------------- reference


# --------------------------------------------------------------------------------------------- eval


def evaluate_preferences(
    runner: ParallelPolicy,
    reference: Reference,
    items: Sequence[dict[str, Any]],
    objective: Any,
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    image_processor: Any = None,
) -> EvalResult:
    """Mean loss and reward metrics of ``objective`` over prepared ``items``, with per-example values:
    the trainer's own evaluation loop (:func:`dpokit.training.step.evaluate`) on padded batches
    (``image_processor``: a vision-language model's, for items with images)."""
    from dpokit.data import PaddedCollator

    if len(items) == 0:
        raise ConfigError("the evaluation dataset is empty")
    return evaluate(
        runner,
        Split.of_items(items),
        reference,
        objective,
        PaddedCollator(pad_token_id, image_processor=image_processor),
        batch_size=batch_size,
        keep_per_example=True,
    )


# Shown first, in this order, in the printed table.
HEADLINE_METRICS = ("rewards/accuracies", "rewards/margins", "loss", "rewards/chosen", "rewards/rejected")


def format_metrics_table(metrics: dict[str, float]) -> str:
    """One line per metric, headline metrics first; a fraction's example count shows beside it: ``0.7500 (n=8)``."""
    counts = {name: f" (n={metrics[name + '_n']:g})" for name in metrics if name + "_n" in metrics}
    shown = {name: value for name, value in metrics.items() if not (name.endswith("_n") and name[:-2] in counts)}
    names = [name for name in HEADLINE_METRICS if name in shown] + sorted(set(shown) - set(HEADLINE_METRICS))
    width = max(len(name) for name in names)
    return "\n".join(f"  {name:<{width}}  {shown[name]:.4f}{counts.get(name, '')}" for name in names)


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


@dataclass
class EvalJob:
    """What ``dpokit eval`` evaluates: ``model`` on preference data against a reference.

    Every setting left None comes from the training configuration (:func:`training_defaults`):
    ``beta``, ``reference_free`` and the loss terms (``loss`` names a single term instead) from its
    ``loss`` section; ``data`` (its ``eval_path``), ``split``, ``format``, ``cache_dir`` and the
    lengths from its ``data`` section. ``limit`` keeps the first N examples.
    """

    model: str
    reference: str | None = None
    reference_free: bool = False
    data: str | None = None
    split: str | None = None
    format: str | None = None
    limit: int | None = None
    cache_dir: str | None = None
    max_length: int | None = None
    max_prompt_length: int | None = None
    batch_size: int = 8
    loss: str | None = None
    beta: float | None = None
    config: str | None = None
    load: LoadOptions = field(default_factory=LoadOptions)


@dataclass
class EvalReport:
    """An evaluation: ``summary`` (model, reference, data, num_examples, beta, loss_terms, metrics --
    what ``--json`` prints), the per-example ``result`` and the data pipeline's ``data_report``."""

    summary: dict[str, Any]
    result: EvalResult
    data_report: Any


def run_eval(job: EvalJob) -> EvalReport:
    """Load the policy and reference, prepare the data as training does, and evaluate."""
    from dpokit.data import PrepareOptions, prepare_dataset
    from dpokit.losses import build_objective

    check_batch_size(job.batch_size)
    policy = load_policy(job.model, job.load)
    train = training_defaults(policy, job.config)
    data, loss = train.data, train.loss
    beta = float(_first(job.beta, loss.beta))
    terms = [{"name": job.loss}] if job.loss else loss.terms
    data_path = _first(job.data, data.eval_path)
    if not data_path:
        raise ConfigError("no evaluation data: pass --data PATH (or --config with data.eval_path set)")
    runner = policy_runner(policy)
    reference, described = resolve_reference(
        policy, runner, job.reference, reference_free=job.reference_free or loss.reference_free, load=job.load
    )
    objective = build_objective(terms, beta=beta, reference_free=isinstance(reference, NoReference))
    prepare = PrepareOptions.from_config(
        data,
        format=_first(job.format, data.format),
        split=_first(job.split, data.eval_split),
        max_length=int(_first(job.max_length, data.max_length)),
        max_prompt_length=int(_first(job.max_prompt_length, data.max_prompt_length)),
    )
    dataset = prepare_dataset(
        data_path, policy.tokenizer, prepare, cache_dir=_first(job.cache_dir, data.cache_dir), processor=policy.processor
    )
    items: Sequence[dict[str, Any]] = dataset.items
    if job.limit is not None:
        items = [items[index] for index in range(min(job.limit, len(items)))]
    result = evaluate_preferences(
        runner,
        reference,
        items,
        objective,
        batch_size=job.batch_size,
        pad_token_id=pad_id_of(policy.tokenizer),
        image_processor=getattr(policy.processor, "image_processor", None),
    )
    summary = {
        "model": str(job.model),
        "reference": described,
        "data": str(data_path),
        "num_examples": result.num_examples,
        "beta": beta,
        "loss_terms": terms,
        "metrics": result.metrics,
    }
    return EvalReport(summary=summary, result=result, data_report=dataset.report)
