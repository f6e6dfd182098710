"""Rewards of responses, below both the judges and the analysis commands that use them.

* The implicit reward of a DPO policy (the paper's title): r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)),
  summed over the response tokens (with no reference, r = beta * log pi(y|x)), computed by
  :func:`score_rows` through the same data pipeline and log-prob code as training. Under Bradley-Terry,
  P(y_1 > y_2 | x) = sigmoid(r(x, y_1) - r(x, y_2)); for K responses softmax(r)_k is the probability
  that response k is the best. Z(x) cancels in both, so rewards compare only within one prompt.
* Where pi_ref comes from (:func:`resolve_reference`) and which training settings a saved model carries
  (:func:`training_defaults`), as ``dpokit eval``, ``dpokit score`` and the implicit judge share them.
* Explicit rewards (:func:`load_reward`): a ``module:function`` or a sequence-classification model.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpokit.data.schema import Text
from dpokit.errors import ConfigError, DataError
from dpokit.models import LoadedPolicy, LoadOptions, load_policy, pad_id_of
from dpokit.training.parallel import ParallelContext, ParallelPolicy
from dpokit.training.reference import AdapterDisabledReference, CopyReference, NoReference, Reference

logger = logging.getLogger(__name__)

# Token limits for a model without a run configuration: scoring reads whole responses, so these are
# twice training's defaults (dpokit.config.DataConfig); a run's own data.max_length/max_prompt_length win.
DEFAULT_MAX_LENGTH = 1024
DEFAULT_MAX_PROMPT_LENGTH = 512
RewardFn = Callable[..., Sequence[float]]


# -------------------------------------------------------------------------- the reference and settings


def policy_runner(policy: LoadedPolicy, chunk_size: int = 1024) -> ParallelPolicy:
    """The loaded policy as the engine runs it: a world of one on the policy's device."""
    return ParallelPolicy(ParallelContext(device=next(policy.model.parameters()).device), policy.model, chunk_size=chunk_size)


def resolve_reference(
    policy: LoadedPolicy,
    runner: ParallelPolicy,
    reference_path: str | None,
    *,
    reference_free: bool = False,
    load: LoadOptions | None = None,
) -> tuple[Reference, str]:
    """pi_ref and a description of it: ``--reference``, else the adapter's base (the policy with its
    adapter disabled), else the model the run started from; or none for ``--reference-free``. A reference
    model loads with ``load`` (None: :class:`LoadOptions`' defaults)."""
    if reference_free:
        if reference_path:
            raise ConfigError("give either --reference or --reference-free, not both")
        return NoReference(), "no reference (reference-free)"
    if reference_path:
        reference = load_policy(reference_path, load)
        return CopyReference(reference.model), f"reference model {reference_path}"
    if policy.is_adapter:
        return AdapterDisabledReference(runner), "base model with the adapter disabled"
    run_config = policy.run_config or {}
    # The run's reference: reference.name_or_path when it set one, else the model it started from.
    start_model = (run_config.get("reference") or {}).get("name_or_path") or (run_config.get("model") or {}).get("name_or_path")
    if start_model and Path(str(start_model)).resolve() != Path(policy.path).resolve():
        reference = load_policy(start_model, load)
        return CopyReference(reference.model), f"reference model {start_model}"
    raise ConfigError(
        f"{policy.path} is a full model with no record of its reference model: pass --reference PATH "
        "(usually the SFT model training started from) or --reference-free"
    )


def training_defaults(policy: LoadedPolicy, config_path: str | None = None) -> Any:
    """The :class:`dpokit.config.TrainConfig` that eval/score take unset settings from: the file
    ``config_path`` when given, else the run configuration saved with the model, else the defaults."""
    from dpokit.config import TrainConfig, config_from_dict, load_config

    if config_path:
        return load_config(config_path)
    if policy.run_config:
        try:
            return config_from_dict(policy.run_config)
        except ConfigError as error:
            raise ConfigError(
                f"{policy.path}: the training configuration saved with this model cannot be read ({error}); "
                "pass --config CONFIG.yaml"
            ) from None
    return TrainConfig()


def check_batch_size(batch_size: int, setting: str = "--batch-size") -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{setting} must be a positive whole number, got {batch_size!r}")


def iterate_batches(items: Any, batch_size: int, pad_token_id: int, image_processor: Any = None) -> Iterator[Any]:
    """Padded batches of ``batch_size`` consecutive prepared items, in dataset order (``image_processor``:
    a vision-language model's, for items with images)."""
    from dpokit.data import PaddedCollator

    collate = PaddedCollator(pad_token_id, image_processor=image_processor)
    for start in range(0, len(items), batch_size):
        yield collate([items[index] for index in range(start, min(start + batch_size, len(items)))])


# ---------------------------------------------------------------------------------- implicit rewards


@dataclass
class ScoreRow:
    """One input row: a prompt and the responses to score (in the order given), and the prompt's images
    (encoded files, with where each came from)."""

    prompt: Text
    responses: list[Text]
    source: str
    images: list[bytes] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)


@dataclass
class ScoredRow:
    """Rewards for one row. ``preference_prob`` (pairs): P(responses[0] preferred to responses[1]);
    ``best_prob`` (K >= 2): softmax of the rewards, P(response k is the best)."""

    prompt: Text
    responses: list[Text]
    rewards: list[float]
    policy_logps: list[float]
    reference_logps: list[float] | None
    preference_prob: float | None
    best_prob: list[float] | None
    source: str
    images: list[str] = field(default_factory=list)  # where the prompt's images came from

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"prompt": self.prompt, "responses": self.responses, "rewards": self.rewards}
        if self.images:
            row["images"] = self.images
        if self.preference_prob is not None:
            row["preference_prob"] = self.preference_prob
        if self.best_prob is not None and len(self.responses) > 2:
            row["best_prob"] = self.best_prob
        row["policy_logps"] = self.policy_logps
        if self.reference_logps is not None:
            row["reference_logps"] = self.reference_logps
        row["source"] = self.source
        return row


def unify_row(prompt: Text, responses: list[Text]) -> tuple[Text, list[Text]]:
    """All text or all chat, as the data pipeline needs: with any chat part, a text prompt becomes a
    user message and text responses become assistant messages."""
    if isinstance(prompt, list) or any(isinstance(response, list) for response in responses):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        responses = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in responses]
    return prompt, responses


def _prepare(rows: Sequence[ScoreRow], tokenizer: Any, *, max_length: int, max_prompt_length: int, processor: Any) -> Any:
    """Token ids for every row through the same data pipeline as training (chat template included)."""
    from dpokit.data import PreferenceExample, PrepareOptions, prepare_from_examples

    # The data pipeline works on rankings of >= 2 responses; a single response is scored as a "pair"
    # with itself and the duplicate dropped afterwards.
    examples = [
        PreferenceExample(
            prompt=row.prompt,
            responses=list(row.responses) if len(row.responses) >= 2 else [row.responses[0], row.responses[0]],
            source=row.source,
            images=list(row.images) or None,
            image_names=list(row.image_names) or None,
        )
        for row in rows
    ]
    # Responses are scored one by one, so two that tokenize alike are both kept.
    return prepare_from_examples(
        examples,
        tokenizer,
        PrepareOptions(max_length=max_length, max_prompt_length=max_prompt_length),
        drop_identical=False,
        processor=processor,
    )


@torch.no_grad()
def score_rows(
    policy: ParallelPolicy,
    tokenizer: Any,
    reference: Reference,
    rows: Sequence[ScoreRow],
    *,
    beta: float,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
    batch_size: int = 8,
    processor: Any = None,
) -> list[ScoredRow]:
    """r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) for every response of every row.

    Log-probs come from ``compute_logps`` on batches of the data pipeline's token ids (the same as
    training), shape ``(B, K)``; responses beyond a row's own count are masked out. ``processor``: a
    vision-language model's, for rows with images.
    """
    prepared = _prepare(rows, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, processor=processor)
    items = prepared.items
    truncated = prepared.report.tokenize.prompt_truncated + prepared.report.tokenize.responses_truncated
    if truncated:
        logger.warning(
            "%d rows were cut to max_length=%d / max_prompt_length=%d tokens; their rewards cover only the kept "
            "tokens (raise --max-length / --max-prompt-length to score them whole)",
            truncated,
            max_length,
            max_prompt_length,
        )
    if len(items) != len(rows):
        raise DataError(f"{len(rows) - len(items)} of {len(rows)} rows could not be tokenized: {prepared.report.summary()}")
    device = policy.ctx.device
    pad_id = pad_id_of(tokenizer)
    scored: list[ScoredRow] = []
    row_index = 0
    for batch in iterate_batches(items, batch_size, pad_id, getattr(processor, "image_processor", None)):
        batch = batch.to(device)
        policy_logps = policy.logps(batch).logps.float().cpu()  # (B, K)
        ref = reference.logps(batch)
        ref_logps = ref.float().cpu() if ref is not None else None
        rewards = beta * (policy_logps - ref_logps) if ref_logps is not None else beta * policy_logps  # (B, K)
        for b in range(batch.batch_size):
            row = rows[row_index]
            row_index += 1
            k = len(row.responses)
            row_rewards = rewards[b, :k]
            preference = float(torch.sigmoid(row_rewards[0] - row_rewards[1])) if k == 2 else None
            best = torch.softmax(row_rewards, dim=0).tolist() if k >= 2 else None
            scored.append(
                ScoredRow(
                    prompt=row.prompt,
                    responses=list(row.responses),
                    rewards=row_rewards.tolist(),
                    policy_logps=policy_logps[b, :k].tolist(),
                    reference_logps=ref_logps[b, :k].tolist() if ref_logps is not None else None,
                    preference_prob=preference,
                    best_prob=best,
                    source=row.source,
                    images=list(row.image_names),
                )
            )
    return scored


# ---------------------------------------------------------------------------------- explicit rewards


def load_reward(spec: str, *, device: str | None = LoadOptions.device) -> RewardFn:
    """A reward from ``module:function`` or from a sequence-classification model directory.

    ``module:function`` must accept ``prompts=[...]`` and ``completions=[...]`` (lists of strings)
    and return one float per pair (the same signature TRL's online trainers use). A directory is
    loaded with :func:`dpokit.models.load_sequence_classifier` (on ``device``) and scores
    ``prompt + completion``: a single-label head gives its logit; otherwise the probability of the
    label named ``positive`` (any case), or of the last label when none is, as the paper's
    p(positive | x, y).
    """
    path = Path(spec)
    if path.is_dir():
        return _classifier_reward(path, device=device)
    if ":" not in spec:
        raise ConfigError(
            f"reward {spec!r} is neither a directory nor 'module:function' (e.g. dpokit.experiments.reward:vader_reward)"
        )
    module_name, function_name = spec.rsplit(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"reward {spec!r}: cannot import module {module_name!r} ({error})") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"reward {spec!r}: module {module_name!r} has no callable {function_name!r}")
    reward: RewardFn = function  # a user's function: its signature is taken on trust
    return reward


def _classifier_reward(model_dir: Path, *, device: str | None, batch_size: int = 64) -> RewardFn:
    from dpokit.models import load_sequence_classifier

    model, tokenizer = load_sequence_classifier(model_dir, device=device)
    config: Any = model.config  # a transformers config, typed Tensor | Module through nn.Module.__getattr__
    labels = {int(k): str(v).lower() for k, v in (config.id2label or {}).items()}
    positive = next((i for i, name in labels.items() if name == "positive"), config.num_labels - 1)
    model_device = next(model.parameters()).device

    @torch.no_grad()
    def reward(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
        scores: list[float] = []
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        for start in range(0, len(texts), batch_size):
            inputs = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True)
            logits = model(**inputs.to(model_device)).logits.float()
            if logits.shape[-1] == 1:
                scores.extend(logits[:, 0].tolist())
            else:
                scores.extend(logits.softmax(-1)[:, positive].tolist())
        return scores

    return reward
