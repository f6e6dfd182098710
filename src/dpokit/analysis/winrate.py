"""Win rates against a baseline across sampling temperatures -- the DPO paper's Figure 2 (right).

For every model and temperature, each prompt's ``samples_per_prompt`` completions (drawn by
:func:`dpokit.generation.generate_samples` through the job's sampling engine: dpokit's generator on the
model loaded here, or a vLLM server that serves it) are compared with a baseline's:
completions of ``--baseline MODEL`` at the same temperature (sample j against sample j; the baseline
uses another seed so that a model compared with itself is not compared with identical text) or the
fixed ``--references FILE`` (e.g. human-written summaries). Each pair is judged in both orders by the
judge of every template, and :mod:`dpokit.judges.stats` turns the judgments into a win rate with a 95%
confidence interval, ties, unparseable judgments, position consistency and position bias, and the
length-controlled win rate (the win rate at equal length, :func:`dpokit.judges.stats.length_controlled`)
with the fitted length effect. With
several templates the report adds each template's win rate, their spread, and the agreement between
templates (fraction of equal outcomes and Cohen's kappa) -- the paper's remark that GPT-4's win rates
depend on its prompt, measured.

Outputs in ``out``: ``winrate.png`` (win rate vs temperature, one line per model, CI bands),
``results.json``, ``results.md``. Samples are stored under ``out/samples/`` keyed by everything that
shapes them -- the model (:func:`model_fingerprint`: with the dpokit engine the content of its weight,
config and tokenizer files, not its path, so a model replaced at the same path is sampled again; with
vLLM the engine, the served model's name, where the server loaded it and its base from, and those
files' content when they are visible here; with a server that each model is loaded into in turn, as the
experiments on vLLM do, the engine and the content of the weights it was given), the prompts and the
sampling settings -- and judgments in ``out/judgments.jsonl`` (:class:`dpokit.judges.JudgmentCache`), so a
rerun -- or a run resumed after an interruption -- generates and judges only what is missing; a stored file
found unusable is redone.

Prompts with images (a vision-language model; rows with ``images`` as ``dpokit generate`` reads them) are
sampled with their images by the dpokit engine and judged with them: the judge must read images (a
``reward:`` function with an ``images`` parameter, or ``implicit:`` of a vision-language policy; see
:mod:`dpokit.judges.base`), and the stored samples and judgments are keyed by the images' content too.
The baseline is then a model (``--references`` are matched to prompts by text, which images would not tell apart).

:func:`run_judge_check` is ``dpokit judge-check``: a judge's agreement with held-out preference labels
(``chosen`` preferred to ``rejected``), with its position bias, before it is trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpokit.data.prompts import PromptRow
from dpokit.errors import ConfigError, DataError, DpokitError
from dpokit.generation.engines import EngineOptions, ModelSampler
from dpokit.judges import CachedJudge, Judge, JudgmentCache, load_judge, load_template
from dpokit.judges.base import Images, PairJudgment, Text, text_of
from dpokit.judges.cache import images_digest
from dpokit.judges.stats import INCONSISTENT_POLICIES, agreement, win_stats
from dpokit.models import LoadOptions

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from dpokit.analysis.frontier import CheckpointServer

Log = Callable[[str], None]
BASELINE_SEED_OFFSET = 1_000_003  # the baseline model samples with seed + this
logger = logging.getLogger(__name__)


@dataclass
class WinrateJob:
    """What ``dpokit winrate`` does; every default lives here."""

    models: list[tuple[str, str]]
    judge: str
    prompts: str | None = None
    baseline: str | None = None
    references: str | None = None
    templates: list[str] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples_per_prompt: int = 1
    max_new_tokens: int = 64
    max_prompts: int | None = None
    seed: int = 0
    out: str = "winrate"
    inconsistent: str = "tie"
    ci: str = "bootstrap"
    bootstrap_samples: int = 2000
    batch_size: int = 64
    chat_template: str = "auto"
    title: str | None = None
    progress: bool = True
    load: LoadOptions = field(default_factory=LoadOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)  # who samples (--engine); every model is sampled by it

    def validate(self) -> None:
        self.engine.validate()
        if not self.models:
            raise ConfigError("no models: give --model PATH (or NAME=PATH), repeatable")
        if (self.baseline is None) == (self.references is None):
            raise ConfigError("give exactly one of --baseline MODEL or --references FILE")
        if self.prompts is None and self.references is None:
            raise ConfigError("no prompts: give --prompts FILE (or --references FILE with 'prompt' fields)")
        if not self.temperatures or any(not t >= 0 for t in self.temperatures):
            raise ConfigError(f"temperatures must be >= 0, got {self.temperatures}")
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt must be at least 1, got {self.samples_per_prompt}")
        if self.inconsistent not in INCONSISTENT_POLICIES:
            raise ConfigError(f"inconsistent must be one of {INCONSISTENT_POLICIES}, not {self.inconsistent!r}")
        if self.ci not in ("bootstrap", "wilson"):
            raise ConfigError(f"ci must be bootstrap or wilson, not {self.ci!r}")
        names = [name for name, _ in self.models]
        if len(set(names)) != len(names) or "baseline" in names:
            raise ConfigError(f"model names must be distinct and not 'baseline': {names}")


# ------------------------------------------------------------------------------------------ inputs


def read_references(path: str | Path) -> list[tuple[Text, Text]]:
    """``(prompt, reference)`` rows of a JSONL/JSON/CSV/Parquet file with ``prompt`` and ``reference``
    (or ``chosen`` / ``response``) fields."""
    from dpokit.data.reader import file_rows

    rows: list[tuple[Text, Text]] = []
    for where, row in file_rows(path):
        if not isinstance(row, dict) or row.get("prompt") in (None, ""):
            raise DataError(f"{where}: missing field 'prompt'")
        reference = next((row[k] for k in ("reference", "chosen", "response") if row.get(k) not in (None, "")), None)
        if reference is None:
            raise DataError(f"{where}: missing field 'reference' (or 'chosen' / 'response'): the baseline response")
        rows.append((row["prompt"], reference))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def prompts_and_references(job: WinrateJob) -> tuple[list[Any], list[Text] | None]:
    """The prompts of a win-rate job (``--prompts``, else the references' prompts; ``max_prompts`` of them)
    and, with ``--references``, the reference of each prompt (None with a baseline model). Prompts with
    images are refused here (:func:`prompt_rows_and_references` reads them)."""
    rows, references = prompt_rows_and_references(job)
    for row in rows:
        if row.images:
            raise DataError(f"{row.where}: field 'images': this command does not sample prompts with images yet")
    return [row.prompt for row in rows], references


def prompt_rows_and_references(job: WinrateJob) -> tuple[list[PromptRow], list[Text] | None]:
    """:func:`prompts_and_references` with each prompt's row: where it came from and its images (read and
    checked, paths relative to the prompts file). Prompts with images need a baseline model."""
    from dpokit.data.prompts import read_prompt_rows

    references = read_references(job.references) if job.references else None
    if job.prompts:
        rows = read_prompt_rows(job.prompts, images=True)
        pictured = next((row for row in rows if row.images), None)
        if pictured is not None and references is not None:
            raise DataError(
                f"{pictured.where}: field 'images': --references are matched to prompts by their text, which does not tell "
                "prompts with images apart; compare with a --baseline model instead"
            )
        prompts: list[Any] = [row.prompt for row in rows]
        if references is not None:
            by_prompt = {json.dumps(p, sort_keys=True): r for p, r in references}
            missing = [i for i, p in enumerate(prompts) if json.dumps(p, sort_keys=True) not in by_prompt]
            if missing:
                raise DataError(f"{job.prompts}: prompt {missing[0] + 1} has no row in {job.references}")
            references = [(p, by_prompt[json.dumps(p, sort_keys=True)]) for p in prompts]
    else:
        rows = [PromptRow(p, f"{job.references}: row {i + 1}") for i, (p, _) in enumerate(references or [])]
    if job.max_prompts is not None:
        rows = rows[: job.max_prompts]
        references = None if references is None else references[: job.max_prompts]
    if not rows:
        raise DataError("no prompts to evaluate")
    return rows, None if references is None else [r for _, r in references]


# --------------------------------------------------------------------------------------- sampling


# Files of a model directory that shape its samples: weights, configs, tokenizer files, remote code.
FINGERPRINTED_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".py")
FINGERPRINTS_FILE = "weight_digests.json"  # in out/: the content hash of each model file, by (size, mtime)


def _file_digest(path: Path, memo: dict[str, Any]) -> str:
    """sha256 of ``path``'s bytes, reused from ``memo`` while the file's size and mtime are unchanged."""
    stat = path.stat()
    known = memo.get(str(path))
    if isinstance(known, dict) and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return str(known.get("sha256"))
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    memo[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return digest.hexdigest()


def weights_fingerprint(path: str, memo: dict[str, Any], *, _depth: int = 0) -> str:
    """A digest of what a model path holds: the content of its weight, config and tokenizer files (and,
    for a LoRA adapter, its base model's), so a model replaced at the same path gets a new fingerprint.
    A hub id (nothing local) is fingerprinted by its name."""
    from dpokit.models import CHECKPOINT_MODEL_SUBDIRS

    given = Path(path).expanduser()
    if not given.exists():
        return f"hub:{path}"
    directory = given
    if given.is_dir() and not any((given / n).is_file() for n in ("config.json", "adapter_config.json")):
        directory = next((given / n for n in CHECKPOINT_MODEL_SUBDIRS if (given / n / "config.json").is_file()
                          or (given / n / "adapter_config.json").is_file()), given)  # fmt: skip
    files = [given] if given.is_file() else sorted(p for p in directory.iterdir() if p.is_file())
    parts = [(p.name, _file_digest(p.resolve(), memo)) for p in files if p.suffix in FINGERPRINTED_SUFFIXES]
    adapter = directory / "adapter_config.json"
    if adapter.is_file() and _depth == 0:
        try:
            base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError):
            base = None
        if isinstance(base, str) and base:
            parts.append(("base", weights_fingerprint(base, memo, _depth=1)))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _read_memo(path: Path) -> dict[str, Any]:
    """The stored file digests; an unreadable store is ignored (the files are hashed again)."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def model_fingerprint(
    path: str, job: WinrateJob, memo: dict[str, Any], server: CheckpointServer | None = None
) -> tuple[str, ModelSampler | None]:
    """What a model's samples are keyed by, and the model opened for sampling when that took opening it.

    dpokit engine: :func:`weights_fingerprint` of ``path`` (nothing is loaded). A ``server`` that each model
    is loaded into in turn (the experiments on vLLM): the engine and :func:`weights_fingerprint` of ``path``,
    the weights it is given (nothing is loaded). vLLM otherwise: the server is asked
    which served model ``path`` names (an error when it serves none such), and the key is the engine, that
    model's served name, where the server loaded it and its base from, and the content of those directories
    when they are visible here -- so vLLM samples are never mistaken for the dpokit engine's samples of the
    same weights, nor for another served model's. A server whose weights were reloaded in place under the
    same name from other files is not told apart: delete ``out/samples`` to sample it again."""
    from dpokit.generation import open_sampler

    if server is not None:
        return hashlib.sha256(json.dumps(["vllm", "loaded", weights_fingerprint(path, memo)]).encode()).hexdigest(), None
    if job.engine.engine == "dpokit":
        return weights_fingerprint(path, memo), None
    opened = open_sampler(path, job.engine, job.load, batch_size=job.batch_size)
    served = opened.served
    assert served is not None  # a vLLM sampler always names its served model
    contents = [weights_fingerprint(root, memo) if root else None for root in (served.root, served.parent_root)]
    payload = ["vllm", served.name, served.root, served.parent, served.parent_root, contents]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest(), opened


def _sample_key(
    fingerprint: str, prompts: Sequence[Any], temperature: float, seed: int, job: WinrateJob, images: Images | None = None
) -> str:
    """What a stored sample file is keyed by: the model's weights (not its path), the prompts (and the content
    of their images, when they have any) and every sampling setting."""
    payload: list[Any] = [
        fingerprint,
        prompts,
        temperature,
        seed,
        job.samples_per_prompt,
        job.max_new_tokens,
        job.chat_template,
        job.load.dtype,
    ]
    if images and any(images):
        payload.append([images_digest(group) for group in images])
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _stored_samples(stored: Path, num_prompts: int, job: WinrateJob) -> list[list[str]] | None:
    """The completions of a stored sample file, or None (with a warning naming it) when it is unusable:
    cut short, not JSON, or not ``num_prompts`` lists of ``samples_per_prompt`` strings."""
    try:
        completions = json.loads(stored.read_bytes().decode("utf-8"))["completions"]
        shape_ok = (
            isinstance(completions, list)
            and len(completions) == num_prompts
            and all(
                isinstance(group, list) and len(group) == job.samples_per_prompt and all(isinstance(c, str) for c in group)
                for group in completions
            )
        )
        problem = None if shape_ok else f"not {num_prompts} prompts x {job.samples_per_prompt} completions (strings)"
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem is None:
        return list(completions)
    logger.warning("%s: unusable stored samples (%s); sampling them again", stored, problem)
    return None


def sample_model(
    name: str,
    path: str,
    prompts: Sequence[Any],
    job: WinrateJob,
    *,
    seed: int,
    advance: Callable[[], object],
    images: Images | None = None,
    server: CheckpointServer | None = None,
) -> dict[float, list[list[str]]]:
    """``{temperature: [[completion per sample] per prompt]}`` for one model; stored under
    ``out/samples/NAME/`` keyed by the model's weights and the sampling settings, and read back instead
    of sampled again when they match (a stored file that is unusable is sampled again). The job's engine
    samples; with the dpokit engine the model is loaded only when something is missing. ``server``: a vLLM
    server the model is loaded into (:func:`served_sampler`) when something is missing, which samples it
    instead. ``images``: per prompt, its images (a vision-language model reads them with its processor)."""
    from dpokit.generation import SamplingConfig, generate_samples, open_sampler

    directory = Path(job.out) / "samples" / name
    memo_path = Path(job.out) / FINGERPRINTS_FILE
    memo = _read_memo(memo_path)
    fingerprint, opened = model_fingerprint(path, job, memo, server)
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    memo_path.with_suffix(".tmp").write_text(json.dumps(memo, indent=1), encoding="utf-8")
    memo_path.with_suffix(".tmp").replace(memo_path)
    result: dict[float, list[list[str]]] = {}
    for temperature in job.temperatures:
        key = _sample_key(fingerprint, prompts, temperature, seed, job, images)
        stored = directory / f"t{temperature:g}-{key}.json"
        reused = _stored_samples(stored, len(prompts), job) if stored.exists() else None
        if reused is not None:
            result[temperature] = reused
            advance()
            continue
        if opened is None and server is not None:
            opened = served_sampler(server, name, path)
        elif opened is None:
            opened = open_sampler(path, job.engine, job.load, batch_size=job.batch_size)
        sampling = SamplingConfig(
            max_new_tokens=job.max_new_tokens, temperature=temperature, num_samples=job.samples_per_prompt, seed=seed
        )
        rows = None
        if images and any(images):
            rows = [PromptRow(p, f"prompt {i + 1}", tuple(images[i])) for i, p in enumerate(prompts)]
        samples = generate_samples(
            None,
            opened.tokenizer,
            prompts,
            sampling,
            chat_template=job.chat_template,
            engine=opened.engine,
            rows=rows,
            processor=opened.processor,
        )
        grouped: list[list[str]] = [[] for _ in prompts]
        for sample in samples:
            grouped[sample.prompt_index].append(sample.completion)
        record = {"model": path, "engine": opened.engine.name, "weights": fingerprint, "temperature": temperature}
        _write_samples(stored, {**record, "completions": grouped})
        result[temperature] = grouped
        advance()
    return result


def served_sampler(server: CheckpointServer, name: str, path: str) -> ModelSampler:
    """The model saved at ``path`` loaded into ``server`` (as ``name``, made a valid adapter name; the
    reference's own weights given back when ``path`` is the reference), sampled with the reference's tokenizer."""
    if Path(path).expanduser().resolve() == server.reference.resolve():
        server.restore()
        return ModelSampler(server.engine, server.tokenizer)
    return ModelSampler(server.serve(path, re.sub(r"[^A-Za-z0-9._-]+", "-", f"winrate-{name}")), server.tokenizer)


def store_samples(
    name: str,
    path: str,
    prompts: Sequence[Any],
    job: WinrateJob,
    completions: Mapping[float, list[list[str]]],
    *,
    seed: int,
    server: CheckpointServer | None = None,
) -> None:
    """Store ``{temperature: [[completion per sample] per prompt]}`` where :func:`sample_model` reads them
    back for the model ``name`` at ``path`` sampled with ``seed``, so a model that cannot be loaded (such
    as best-of-n picked from another model's samples, under a path of its own) takes part in a win-rate
    run. Each temperature needs ``job.samples_per_prompt`` completions for each prompt (keyed as the dpokit
    engine's samples, such a model having no served name; with ``server``, as that server's samples)."""
    memo = _read_memo(Path(job.out) / FINGERPRINTS_FILE)
    fingerprint = model_fingerprint(path, job, memo, server)[0] if server else weights_fingerprint(path, memo)
    for temperature, grouped in completions.items():
        key = _sample_key(fingerprint, prompts, temperature, seed, job)
        stored = Path(job.out) / "samples" / name / f"t{temperature:g}-{key}.json"
        record = {"model": path, "engine": server.engine.name if server else "dpokit", "weights": fingerprint}
        _write_samples(stored, {**record, "temperature": temperature, "completions": grouped})


def _write_samples(stored: Path, record: dict[str, Any]) -> None:
    """Write a sample file through a temporary file renamed into place: an interruption leaves no torn file."""
    stored.parent.mkdir(parents=True, exist_ok=True)
    partial = stored.with_suffix(".tmp")
    partial.write_text(json.dumps(record), encoding="utf-8")
    partial.replace(stored)


# ---------------------------------------------------------------------------------------- judging


def judge_both_orders(
    judge: Judge, prompts: Sequence[Text], x: Sequence[Text], y: Sequence[Text], images: Images | None = None
) -> list[tuple[PairJudgment, PairJudgment]]:
    """Each pair judged as (A=x, B=y) and as (A=y, B=x), in one batch: ``[(forward, swapped)]``; ``images``:
    each pair's prompt images, for a judge that reads them."""
    n = len(prompts)
    asked = ([*prompts, *prompts], [*x, *y], [*y, *x])
    # Images only when there are some: a judge written for text takes three arguments.
    judgments = judge.judge_pairs(*asked) if images is None or not any(images) else judge.judge_pairs(*asked, [*images, *images])
    return list(zip(judgments[:n], judgments[n:], strict=True))


def length_differences(x: Sequence[Text], y: Sequence[Text]) -> list[float]:
    """Each pair's length difference in characters, len(x) - len(y) (chat messages: their joined text)."""
    return [float(len(text_of(a)) - len(text_of(b))) for a, b in zip(x, y, strict=True)]


def template_judges(job: WinrateJob, cache: JudgmentCache) -> dict[str, CachedJudge]:
    """One cached judge per template (``"-"`` when the judge takes none); a local model is loaded once."""
    if not job.templates:
        return {"-": CachedJudge(load_judge(job.judge, load=job.load), cache)}
    first = load_judge(job.judge, job.templates[0], load=job.load)
    return {name: CachedJudge(first.with_template(load_template(name)), cache) for name in job.templates}


def _flatten(
    prompts: Sequence[Any], model: Sequence[Sequence[Text]], baseline: Sequence[Sequence[Text]]
) -> tuple[list[Any], list[Text], list[Text], list[int]]:
    """Pairs (prompt, sample j of the model, sample j of the baseline) and each pair's prompt index."""
    flat_prompts: list[Any] = []
    xs: list[Text] = []
    ys: list[Text] = []
    groups: list[int] = []
    for index, prompt in enumerate(prompts):
        for sample_index, completion in enumerate(model[index]):
            flat_prompts.append(prompt)
            xs.append(completion)
            ys.append(baseline[index][sample_index])
            groups.append(index)
    return flat_prompts, xs, ys, groups


# --------------------------------------------------------------------------------------- the run


def _template_summary(rows: list[dict[str, Any]], outcomes: dict[tuple[str, float, str], list[str]]) -> dict[str, Any]:
    """Per-template mean win rates, their spread, and template-vs-template agreement."""
    templates = sorted({row["template"] for row in rows})
    if len(templates) < 2:
        return {}
    per_template = {}
    for template in templates:
        rates = [row["win_rate"] for row in rows if row["template"] == template and row["win_rate"] is not None]
        per_template[template] = sum(rates) / len(rates) if rates else None
    spreads = []
    for key in {(row["model"], row["temperature"]) for row in rows}:
        rates = [row["win_rate"] for row in rows if (row["model"], row["temperature"]) == key and row["win_rate"] is not None]
        if rates:
            spreads.append(max(rates) - min(rates))
    pairs = []
    for left, right in combinations(templates, 2):
        a = [o for (m, t, tpl), values in sorted(outcomes.items()) if tpl == left for o in values]
        b = [o for (m, t, tpl), values in sorted(outcomes.items()) if tpl == right for o in values]
        pairs.append({"templates": [left, right], **agreement(a, b)})
    return {
        "mean_win_rate": per_template,
        "spread_mean": sum(spreads) / len(spreads) if spreads else None,
        "spread_max": max(spreads) if spreads else None,
        "agreement": pairs,
    }


def run_winrate(job: WinrateJob, log: Log | None = None, *, server: CheckpointServer | None = None) -> dict[str, Any]:
    """Generate, judge, and write ``winrate.png``, ``results.json`` and ``results.md`` into ``job.out``.

    ``server``: a vLLM server serving the baseline, into which every model (the baseline's weights included)
    is loaded in turn to be sampled (:func:`served_sampler`; the experiments on vLLM), its samples keyed
    apart from the dpokit engine's; the caller gives the server its weights back afterwards.
    Progress goes to standard error as ``dpokit train``'s does: a bar redrawn in place on a terminal, one
    plain line per step (no carriage returns) in a log or a pipe."""
    from dpokit.training.tracking import progress_bar

    job.validate()
    log = log or (lambda line: None)
    prompt_rows, references = prompt_rows_and_references(job)
    prompts = [row.prompt for row in prompt_rows]
    images = [list(row.images) for row in prompt_rows] if any(row.images for row in prompt_rows) else None
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    judges = template_judges(job, JudgmentCache(out / "judgments.jsonl"))
    sampled = [*job.models, *([("baseline", job.baseline)] if job.baseline else [])]
    total = len(sampled) * len(job.temperatures) + len(job.models) * len(job.temperatures) * len(judges)
    with progress_bar(total, enabled=job.progress, desc="winrate") as bar:

        def advance() -> None:
            bar.update()

        samples = {
            name: sample_model(
                name,
                path,
                prompts,
                job,
                seed=job.seed + (BASELINE_SEED_OFFSET if name == "baseline" else 0),
                advance=advance,
                images=images,
                server=server,
            )
            for name, path in sampled
        }
        rows, outcomes = [], {}
        for (name, _), temperature, (template, judge) in (
            (m, t, j) for m in job.models for t in job.temperatures for j in judges.items()
        ):
            baseline: Sequence[Sequence[Text]] = (
                samples["baseline"][temperature] if job.baseline else [[r] * job.samples_per_prompt for r in references or []]
            )
            flat_prompts, xs, ys, groups = _flatten(prompts, samples[name][temperature], baseline)
            bar.set_postfix(model=name, T=f"{temperature:g}", template=template)
            pairs = judge_both_orders(judge, flat_prompts, xs, ys, None if images is None else [images[g] for g in groups])
            stats, outcome = win_stats(
                pairs,
                groups,
                inconsistent=job.inconsistent,
                ci=job.ci,
                bootstrap_samples=job.bootstrap_samples,
                seed=job.seed,
                length_differences=length_differences(xs, ys),
            )
            outcomes[(name, temperature, template)] = outcome
            rows.append({"model": name, "temperature": temperature, "template": template, **stats.to_dict()})
            bar.update()
    cached = sum(j.hits for j in judges.values())
    log(f"judgments: {sum(j.misses for j in judges.values())} asked, {cached} from the cache")
    results = {
        "job": {**asdict(job), "load": asdict(job.load)},
        "judge": job.judge,
        "num_prompts": len(prompts),
        "results": rows,
        "templates": _template_summary(rows, outcomes),
    }
    write_winrate_outputs(results, out, title=job.title)
    return results


# --------------------------------------------------------------------------------------- outputs


def format_stat(value: Any, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or "–" for a missing (None or NaN) statistic."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


INTERVALS_NOTE = (
    "n: pairs judged (unparseable ones left out). interval: bootstrap = percentile bootstrap over prompts; "
    "wilson = Wilson score interval, also used where the bootstrap collapses (a win rate of 0 or 1, or every "
    "resample alike), with n = the number of prompts."
)


LENGTH_CONTROL_NOTE = (
    "LC: the length-controlled win rate, the win rate at equal length of a logistic fit of each pair's outcome "
    "(win 1, tie 1/2, loss 0) on tanh(length difference / its sd), lengths in characters; length effect: the fit's "
    "coefficient of that term (> 0: the judge prefers the longer response). Both with a percentile bootstrap over prompts."
)


def has_length_control(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether the rows carry the length-controlled win rate (results written before it had none)."""
    return any("lc_win_rate" in row for row in rows)


def length_control_cells(row: dict[str, Any]) -> str:
    """The length-controlled win rate and the length effect, each with its 95% interval, as two table cells."""
    rate = f"{format_stat(row.get('lc_win_rate'))} [{format_stat(row.get('lc_ci_low'))}, {format_stat(row.get('lc_ci_high'))}]"
    effect = row.get("length_effect")
    low, high = row.get("length_effect_ci_low"), row.get("length_effect_ci_high")
    span = f" [{format_stat(low, 2)}, {format_stat(high, 2)}]" if low is not None else ""
    return f" {rate} | {format_stat(effect, 2)}{span} |"


def _judged(row: dict[str, Any]) -> int:
    return int(row["wins"]) + int(row["ties"]) + int(row["losses"])


def results_markdown(results: dict[str, Any]) -> str:
    """The results table: each win rate with its n, its 95% interval and the method that gave the interval."""
    lc = has_length_control(results["results"])
    lines = [
        "| model | T | template | win rate (n) [95% CI] | interval | W / T / L | unparseable | consistency | position bias |"
        + (" LC win rate [95% CI] | length effect [95% CI] |" if lc else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if lc else ""),
    ]
    for r in results["results"]:
        ci = f"{format_stat(r['win_rate'])} (n={_judged(r)}) [{format_stat(r['ci_low'])}, {format_stat(r['ci_high'])}]"
        lines.append(
            f"| {r['model']} | {r['temperature']:g} | {r['template']} | {ci} | {r.get('ci_method', '–')} "
            f"| {r['wins']} / {r['ties']} / {r['losses']} "
            f"| {r['unparseable']} | {format_stat(r['position_consistency'], 2)} | {format_stat(r['position_bias'], 2)} |"
            + (length_control_cells(r) if lc else "")
        )
    lines += ["", INTERVALS_NOTE] + (["", LENGTH_CONTROL_NOTE] if lc else [])
    summary = results.get("templates") or {}
    if summary:
        lines += ["", "| template | mean win rate |", "|---|---|"]
        lines += [f"| {name} | {format_stat(rate)} |" for name, rate in summary["mean_win_rate"].items()]
        spread = f"mean {format_stat(summary['spread_mean'])}, max {format_stat(summary['spread_max'])}"
        lines += ["", f"win-rate spread across templates: {spread}"]
        lines += ["", "| templates | pairs | agreement | Cohen's κ |", "|---|---|---|---|"]
        lines += [
            f"| {' vs '.join(a['templates'])} | {a['n']} | {format_stat(a['agreement'])} | {format_stat(a['kappa'])} |"
            for a in summary["agreement"]
        ]
    return "\n".join(lines) + "\n"


def winrate_subtitle(results: dict[str, Any], template: str) -> str:
    """What a win rate of the figure is measured with: judge (and template), baseline, and n."""
    from dpokit.training.plots import count_label

    job = results.get("job") or {}
    baseline = f"baseline {job['baseline']}" if job.get("baseline") else f"references {job.get('references') or '?'}"
    judge = f"judge {results.get('judge', '?')}" + (f" ({template} template)" if template != "-" else "")
    counts = [_judged(r) for r in results["results"] if r["template"] == template]
    n = count_label(counts) or "n=0"
    prompts, samples = results.get("num_prompts"), job.get("samples_per_prompt")
    plural = "" if samples == 1 else "s"
    per = f" pairs per point ({prompts} prompts x {samples} sample{plural})" if prompts and samples else " pairs per point"
    lc = "; dashed: length-controlled (the win rate at equal length)" if has_length_control(results["results"]) else ""
    return "\n".join(textwrap.wrap(f"{judge}; {baseline}; {n}{per}{lc}", 90))


def winrate_figure(results: dict[str, Any], *, title: str | None = None) -> Figure:
    """Win rate vs temperature, one line per model (first template) with its 95% interval as a band, and
    its length-controlled win rate dashed in the same colour; the subtitle names the judge, the baseline
    and n, and each model's legend entry its n."""
    from matplotlib.figure import Figure

    from dpokit.training.plots import count_label

    rows = results["results"]
    figure = Figure(figsize=(6.4, 4.8))
    axis = figure.subplots()
    template = rows[0]["template"] if rows else "-"
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = sorted((r for r in rows if r["model"] == model and r["template"] == template), key=lambda r: r["temperature"])
        xs = [r["temperature"] for r in mine]
        label = f"{model} ({count_label([_judged(r) for r in mine])})"
        [line] = axis.plot(xs, [r["win_rate"] if r["win_rate"] is not None else math.nan for r in mine], marker="o", label=label)
        low = [r["ci_low"] if r["ci_low"] is not None else math.nan for r in mine]
        high = [r["ci_high"] if r["ci_high"] is not None else math.nan for r in mine]
        axis.fill_between(xs, low, high, alpha=0.2)
        if has_length_control(mine):
            lc = [math.nan if r.get("lc_win_rate") is None else r["lc_win_rate"] for r in mine]
            axis.plot(xs, lc, marker="x", linestyle="--", color=line.get_color(), label=f"{model}, length-controlled")
    axis.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlabel("sampling temperature")
    axis.set_ylabel("win rate vs baseline (95% CI)")
    axis.set_ylim(-0.02, 1.02)
    figure.suptitle(title or "Win rate vs sampling temperature")
    axis.set_title(winrate_subtitle(results, template), fontsize="small")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_winrate(results: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Draw :func:`winrate_figure` of ``results`` (as :func:`run_winrate` returns them) into ``path``."""
    winrate_figure(results, title=title).savefig(path, dpi=120)
    return Path(path)


def write_winrate_outputs(results: dict[str, Any], out: str | Path, *, title: str | None = None) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "winrate.png", "json": out / "results.json", "md": out / "results.md"}
    plot_winrate(results, paths["png"], title=title)
    paths["json"].write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    paths["md"].write_text(results_markdown(results), encoding="utf-8")
    return paths


# ------------------------------------------------------------------------------------ judge-check


JUDGE_CHECK_CHUNK = 16  # pairs per judge call: the progress advances one chunk at a time
LOW_READABLE_RATE = 0.5  # below this fraction of readable verdicts, judge-check warns
BothOrders = list[tuple[PairJudgment, PairJudgment]]  # each pair's (forward, swapped) judgments


JUDGE_CHECK_LENGTH_NOTE = (
    "LC agreement: the agreement (ties ½) at equal length of chosen and rejected, from a logistic fit of each pair's "
    "outcome on tanh(length difference / its sd), lengths in characters; length effect: that term's coefficient "
    "(> 0: the judge agrees more where the chosen response is the longer, i.e. it prefers length beyond the labels). "
    "Both with a percentile bootstrap over pairs."
)


class UnreadableJudgeError(DpokitError):
    """Not one of the judge's verdicts could be read: its agreement would be a table of dashes."""


@dataclass
class JudgeCheckJob:
    """What ``dpokit judge-check`` does: judge ``data``'s pairs (chosen vs rejected) in both orders."""

    judge: str
    data: str
    templates: list[str] = field(default_factory=list)
    limit: int | None = None
    inconsistent: str = "tie"
    cache: str = ".dpokit_cache/judgments/judgments.jsonl"
    progress: bool = True
    load: LoadOptions = field(default_factory=LoadOptions)


def _judge_rows_in_chunks(judge: Judge, rows: Sequence[Any], advance: Callable[[int], None]) -> BothOrders:
    """:func:`judge_both_orders` over ``rows`` (chosen as A first), :data:`JUDGE_CHECK_CHUNK` pairs per call."""
    pairs: BothOrders = []
    for start in range(0, len(rows), JUDGE_CHECK_CHUNK):
        chunk = rows[start : start + JUDGE_CHECK_CHUNK]
        chosen, rejected = [r.responses[0] for r in chunk], [r.responses[1] for r in chunk]
        pairs += judge_both_orders(judge, [r.prompt for r in chunk], chosen, rejected, [r.images for r in chunk])
        advance(len(chunk))
    return pairs


def _verdict_format(judge: Judge, template: str) -> str:
    """How the judge's verdict is read, for a hint: the template's verdict line, or a reward's number."""
    inner = getattr(judge, "judge", judge)
    spec = getattr(inner, "template", None)
    if spec is None:
        return "a reward judge: each response's score must be a number (not NaN)"
    name = template if template != "-" else spec.name
    return f"template {name}: the answer needs a line '{spec.verdict}: A' or '{spec.verdict}: B'"


def _first_answers(pairs: BothOrders, count: int = 3, width: int = 200) -> str:
    answers = [j.raw for pair in pairs for j in pair][:count]
    return "\n".join(f"  {i + 1}. {answer[:width]!r}{'...' if len(answer) > width else ''}" for i, answer in enumerate(answers))


def _readable_verdicts(pairs: BothOrders) -> int:
    return sum(j.verdict is not None for pair in pairs for j in pair)


def check_readable(job: JudgeCheckJob, judged: Mapping[str, tuple[Judge, BothOrders]], log: Log) -> list[str]:
    """Raise :class:`UnreadableJudgeError` (with the format and the first answers) when no verdict could
    be read; return a warning per template whose readable share is under :data:`LOW_READABLE_RATE`."""
    if judged and all(_readable_verdicts(pairs) == 0 for _, pairs in judged.values()):
        template, (judge, pairs) = next(iter(judged.items()))
        raise UnreadableJudgeError(
            f"judge-check: not one of the {2 * len(pairs)} verdicts of judge {job.judge} on {job.data} could be read "
            f"({_verdict_format(judge, template)}). The first answers were:\n{_first_answers(pairs)}\n"
            "Check that the judge follows this format: an instruction-following model, another --templates, or a "
            "larger max_tokens= so the verdict line is not cut off."
        )
    warnings = []
    for template, (judge, pairs) in judged.items():
        readable, total = _readable_verdicts(pairs), 2 * len(pairs)
        if total and readable / total < LOW_READABLE_RATE:
            warnings.append(
                f"warning: judge-check: only {readable} of {total} verdicts ({readable / total:.0%}) of judge {job.judge} could "
                f"be read ({_verdict_format(judge, template)}); the agreement rests on the rest. First answers:\n"
                f"{_first_answers(pairs)}"
            )
            log(warnings[-1])
    return warnings


def run_judge_check(job: JudgeCheckJob, log: Log | None = None) -> dict[str, Any]:
    """Agreement of the judge with the labels (the judge prefers ``chosen``), with a Wilson 95% CI,
    ties, unparseable judgments, position consistency and bias, and the agreement at equal length of chosen
    and rejected (``lc_win_rate``, with the length effect); per template, plus template agreement.

    Progress goes to standard error as ``dpokit train``'s does (a bar on a terminal, plain lines in a log).
    No readable verdict at all raises :class:`UnreadableJudgeError`; under half readable is logged as a
    warning (also in the report's ``warnings``)."""
    from dpokit.analysis.score import read_score_rows
    from dpokit.training.tracking import progress_bar

    log = log or (lambda line: None)
    rows = read_score_rows(job.data)
    for row in rows:
        if len(row.responses) != 2:
            raise DataError(f"{row.source}: judge-check needs pairs: give 'chosen' and 'rejected'")
    rows = rows[: job.limit] if job.limit is not None else rows
    probe = WinrateJob(models=[], judge=job.judge, templates=job.templates, load=job.load)
    judges = template_judges(probe, JudgmentCache(job.cache))
    total = len(rows) * len(judges)
    judged: dict[str, tuple[Judge, BothOrders]] = {}
    with progress_bar(total, enabled=job.progress, desc="judge-check", line_every=max(JUDGE_CHECK_CHUNK, total // 20)) as bar:
        for template, judge in judges.items():
            bar.set_postfix(template=template)
            judged[template] = (judge, _judge_rows_in_chunks(judge, rows, bar.update))
    warnings = check_readable(job, judged, log)
    results, outcomes = [], {}
    lengths = length_differences([r.responses[0] for r in rows], [r.responses[1] for r in rows])
    for template, (_, pairs) in judged.items():
        stats, outcome = win_stats(
            pairs, list(range(len(rows))), inconsistent=job.inconsistent, ci="wilson", length_differences=lengths
        )
        outcomes[template] = outcome
        judged_pairs = stats.wins + stats.ties + stats.losses
        results.append(
            {
                "template": template,
                "agreement": stats.wins / judged_pairs if judged_pairs else None,
                "agreement_ties_half": stats.to_dict()["win_rate"],
                "readable_verdicts": _readable_verdicts(pairs),
                **{k: v for k, v in stats.to_dict().items() if k != "win_rate"},
            }
        )
    between = [{"templates": [a, b], **agreement(outcomes[a], outcomes[b])} for a, b in combinations(outcomes, 2)]
    return {
        "judge": job.judge,
        "data": job.data,
        "num_pairs": len(rows),
        "results": results,
        "template_agreement": between,
        "warnings": warnings,
    }


def judge_check_markdown(report: dict[str, Any]) -> str:
    lc = has_length_control(report["results"])
    lines = [
        f"judge {report['judge']} on {report['num_pairs']} labelled pairs of {report['data']}",
        "",
        "| template | agreement | agreement (ties ½) [95% CI] | W / T / L | unparseable | consistency | position bias |"
        + (" LC agreement [95% CI] | length effect [95% CI] |" if lc else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if lc else ""),
    ]
    for r in report["results"]:
        ci = f"{format_stat(r['agreement_ties_half'])} [{format_stat(r['ci_low'])}, {format_stat(r['ci_high'])}]"
        lines.append(
            f"| {r['template']} | {format_stat(r['agreement'])} | {ci} "
            f"| {r['wins']} / {r['ties']} / {r['losses']} | {r['unparseable']} "
            f"| {format_stat(r['position_consistency'], 2)} | {format_stat(r['position_bias'], 2)} |"
            + (length_control_cells(r) if lc else "")
        )
    for a in report["template_agreement"]:
        lines.append(
            f"\n{' vs '.join(a['templates'])}: agreement {format_stat(a['agreement'])}, "
            f"Cohen's κ {format_stat(a['kappa'])} ({a['n']} pairs)"
        )
    if lc:
        lines += ["", JUDGE_CHECK_LENGTH_NOTE]
    return "\n".join(lines) + "\n"
