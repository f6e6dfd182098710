"""The model card (``README.md``) written beside an exported model.

The card opens with the Hugging Face Hub's YAML front matter -- ``library_name`` (``transformers``, or
``peft`` for an adapter), ``pipeline_tag``, ``tags`` (``dpokit`` and the objective's terms, ``dpo``
for the sigmoid loss), and, when known, ``base_model`` and ``datasets`` (hub ids only: the Hub refuses
local paths there) and the base model's ``license`` -- followed by the objective and its settings, the
data, the final metrics and how to load the model. Everything comes from a :class:`RunSummary`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpokit.config import TrainConfig

CARD_FILENAME = "README.md"
# Objective names the Hub and TRL know under another tag.
_TAGS = {"sigmoid": "dpo", "sft": "sft"}
# The metrics shown first in the results table (the rest follow by name).
_FIRST_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class RunSummary:
    """What the model card says about the run that produced a model.

    ``objective``: the objective as the run described it (terms, parameters, beta); ``steps``: the
    optimizer steps taken; ``train_examples`` / ``eval_examples``: examples after validation, the
    held-out carve-out and truncation drops (None: no held-out data); ``processes``: the world size;
    ``train_metrics`` / ``eval_metrics``: the last logged training averages and the last evaluation;
    ``online``: the run was ``dpokit online`` (its pairs come from the online rounds);
    ``reference``: the reference strategy the run resolved (``reference.strategy: auto`` is resolved).
    """

    config: TrainConfig
    objective: str
    steps: int
    train_examples: int
    eval_examples: int | None = None
    processes: int = 1
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    online: bool = False
    reference: str | None = None


def write_model_card(out_dir: str | Path, summary: RunSummary, *, adapter: bool) -> Path:
    """Write :func:`model_card` to ``<out_dir>/README.md`` (replacing peft's template); return the path."""
    path = Path(out_dir) / CARD_FILENAME
    path.write_text(model_card(summary, out_dir, adapter=adapter), encoding="utf-8")
    return path


def model_card(summary: RunSummary, out_dir: str | Path, *, adapter: bool) -> str:
    """The card's text: YAML front matter, then the run in Markdown (``adapter``: a LoRA adapter export)."""
    metadata = card_metadata(summary, adapter=adapter)
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    cfg = summary.config
    base = cfg.model.name_or_path
    kind = "a LoRA adapter" if adapter else "a causal language model"
    lines = [
        f"---\n{front}---",
        "",
        f"# {_title(out_dir)}",
        "",
        f"{kind[0].upper()}{kind[1:]} trained with dpokit{_version_suffix()} from `{base}` "
        f"({'preference optimization' if not _is_sft(cfg) else 'supervised fine-tuning on the chosen responses'}, "
        f"{summary.steps} optimizer steps).",
        "",
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
        *(f"| {name} | {_cell(value)} |" for name, value in training_settings(summary, adapter=adapter)),
        "",
        "## Data",
        "",
        *data_lines(summary),
        "",
        *results_lines(summary),
        "## How to load",
        "",
        *load_lines(out_dir, base, adapter=adapter),
    ]
    return "\n".join(lines) + "\n"


def card_metadata(summary: RunSummary, *, adapter: bool) -> dict[str, Any]:
    """The YAML front matter: only hub ids under ``base_model`` and ``datasets``."""
    from dpokit.data.reader import FILE_SUFFIXES
    from dpokit.models import is_hub_id

    cfg = summary.config
    metadata: dict[str, Any] = {}
    base = cfg.model.name_or_path
    if is_hub_id(base) and not Path(base).exists():
        metadata["base_model"] = base
    metadata["library_name"] = "peft" if adapter else "transformers"
    metadata["pipeline_tag"] = "text-generation"
    terms = [str(term.get("name", "")) for term in cfg.loss.terms]
    tags = ["dpokit", *dict.fromkeys(_TAGS.get(name, name) for name in terms if name)]
    if adapter:
        tags.append("lora")
    if summary.online:
        tags.append("online-dpo")
    metadata["tags"] = tags
    sources = [cfg.data.train_path, cfg.data.eval_path] if not summary.online else []
    datasets = [s for s in dict.fromkeys(sources) if s and is_hub_id(s, FILE_SUFFIXES) and not Path(s).exists()]
    if datasets:
        metadata["datasets"] = datasets
    license_ = base_model_license(base)
    if license_:
        metadata["license"] = license_
    return metadata


def base_model_license(base: str) -> str | None:
    """The ``license`` in the front matter of the base model's own README.md: the local directory's,
    or the copy in the local hub cache for a hub id (nothing is downloaded); None when unknown."""
    from dpokit.models import is_hub_id

    readme = Path(base).expanduser() / CARD_FILENAME
    if not readme.is_file() and is_hub_id(base):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, CARD_FILENAME)
        readme = Path(cached) if isinstance(cached, str) else readme
    try:
        metadata = read_front_matter(readme.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    value = metadata.get("license")
    return str(value) if isinstance(value, (str, int, float)) and str(value).strip() else None


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML mapping between a card's opening ``---`` line and the next (``{}`` when there is none)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    for end, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            loaded = yaml.safe_load("\n".join(lines[1:end]))
            return loaded if isinstance(loaded, dict) else {}
    return {}


def training_settings(summary: RunSummary, *, adapter: bool) -> list[tuple[str, Any]]:
    """(setting, value) rows: the objective, beta, reference, optimizer, batch, length of the run, LoRA."""
    cfg = summary.config
    o = cfg.optim
    per_step = o.batch_size * o.grad_accumulation * summary.processes
    batch = f"{per_step} examples per step ({o.batch_size} x {o.grad_accumulation} accumulation"
    batch += f" x {summary.processes} processes)" if summary.processes > 1 else ")"
    warmup = f", warm-up {o.warmup_steps} steps" if o.warmup_steps else ""
    rows: list[tuple[str, Any]] = [
        ("objective", summary.objective),
        ("loss terms", ", ".join(_term(term) for term in cfg.loss.terms)),
        ("beta", cfg.loss.beta),
        ("reference", "none (reference-free)" if cfg.loss.reference_free else summary.reference or cfg.reference.strategy),
        ("optimizer", f"{o.optimizer}, lr {o.lr:g}, {o.schedule} schedule{warmup}"),
        ("batch", batch),
        ("steps", summary.steps),
        ("epochs", o.epochs if o.max_steps is None else f"max_steps {o.max_steps}"),
        ("max length", f"{cfg.data.max_length} tokens (prompt {cfg.data.max_prompt_length})"),
        ("dtype", cfg.model.dtype),
        ("seed", o.seed),
    ]
    if cfg.model.lora.enabled:
        lora = cfg.model.lora
        rows.append(("LoRA", f"r {lora.r}, alpha {lora.alpha:g}, {'adapter' if adapter else 'merged into the weights'}"))
    return rows


def data_lines(summary: RunSummary) -> list[str]:
    """Where the training and held-out examples came from, and how many there were."""
    cfg = summary.config
    if summary.online:
        on = cfg.online
        lines = [
            f"- online: {on.rounds} rounds of {on.prompts_per_round} prompts from `{on.prompts_path}`, "
            f"{on.samples_per_prompt} samples each, pairs by `{on.pairs}`, judged by `{_judge_name(on.judge)}`"
        ]
    else:
        lines = [f"- training: `{cfg.data.train_path}` ({summary.train_examples} examples)"]
    if summary.eval_examples is not None:
        source = f"`{cfg.data.eval_path}`" if cfg.data.eval_path else f"{cfg.data.eval_split_fraction:g} of the training data"
        lines.append(f"- evaluation: {source} ({summary.eval_examples} examples)")
    return lines


def results_lines(summary: RunSummary) -> list[str]:
    """The final metrics as a Markdown table (training: the last logged averages), or nothing."""
    train, held_out = summary.train_metrics, summary.eval_metrics
    names = [n for n in _FIRST_METRICS if n in train or n in held_out]
    names += sorted((set(train) | set(held_out)) - set(names))
    if not names:
        return []
    lines = [f"## Results (step {summary.steps})", "", "| metric | training | evaluation |", "| --- | --- | --- |"]
    lines += [f"| {name} | {_number(train.get(name))} | {_number(held_out.get(name))} |" for name in names]
    return [*lines, ""]


def load_lines(out_dir: str | Path, base: str, *, adapter: bool) -> list[str]:
    """A snippet that loads the export: transformers for a model, peft for an adapter."""
    where = str(out_dir)
    if adapter:
        code = [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f"model = AutoPeftModelForCausalLM.from_pretrained({where!r})  # the base model is read from adapter_config.json",
            f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
        ]
        note = f"The adapter loads on top of `{base}`; `model.merge_and_unload()` gives a plain transformers model."
    else:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({where!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
        ]
        note = "The run's `config.yaml` beside the weights lets `dpokit eval` and `dpokit score` find the reference and beta."
    return ["```python", *code, "```", "", note]


def _version_suffix() -> str:
    """``" <installed version>"``, or nothing when dpokit runs from a source tree that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f" {version('dpokit')}"
    except PackageNotFoundError:
        return ""


def _title(out_dir: str | Path) -> str:
    """The export's directory name; the run directory's for the default ``<run_dir>/final``."""
    resolved = Path(out_dir).resolve()
    return resolved.parent.name if resolved.name == "final" and resolved.parent.name else resolved.name


def _is_sft(cfg: TrainConfig) -> bool:
    return [term.get("name") for term in cfg.loss.terms] == ["sft"]


def _term(term: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in term.items() if k != "name")
    return f"{term.get('name')}({params})" if params else str(term.get("name"))


def _judge_name(judge: Any) -> str:
    return str(judge.get("name", judge)) if isinstance(judge, dict) else str(judge)


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def _cell(value: Any) -> str:
    """A table cell: pipes escaped so the table keeps its columns."""
    return str(value).replace("|", "\\|")
