"""The online loop: rounds of sample -> judge -> pairs -> train, on the one trainer.

Read :meth:`OnlineLoop.run` first::

    set up the trainer (policy, reference, optimizer, held-out pairs; resumed position)
    for each round r:
        prompts      chosen from (seed, r)                                   -> prompts.jsonl
        completions  K per prompt from the current policy (each rank a shard) -> completions.jsonl
        judgments    one score per completion, on rank 0, retried             -> judgments.jsonl
        pairs        best_vs_worst | all_pairs | ranking (+ offline rows)     -> pairs.jsonl
        train        steps_per_round optimizer steps on those rows (Trainer.train_until)
        metrics      per-round record in metrics.jsonl / TensorBoard, rounds.png redrawn
    export the model

Every stage's file is written (atomically) before the next stage starts and reused when present, so a
resumed run samples and judges nothing twice (:mod:`dpokit.online.records`). A round spans the global
optimizer steps ``r * steps_per_round + 1 .. (r + 1) * steps_per_round``, so a checkpoint's step says
which round it is in and how far; the checkpoint also records it (``online.round``). The per-step mode
of online AI feedback is ``steps_per_round: 1``: the same code, one small cycle per optimizer step.

Under torchrun every rank samples its contiguous share of the round's prompts (``ctx.rank_slice``; prompt
``i`` is seeded with ``seed + i`` whatever the rank, so the samples do not depend on the number of
processes), the shares are all-gathered, rank 0 judges and writes, the rows are broadcast, and every
rank trains on the union (DDP). FSDP cannot sample (no rank holds the whole model) and is refused.

Prompts with images (a vision-language policy; rows with ``images`` as ``dpokit generate`` reads them): the
round's prompts are encoded with the policy's processor (never cut: a prompt longer than
``data.max_prompt_length`` is an error), sampled and teacher-forced with their images, judged with them (a
judge that reads images, :mod:`dpokit.judges.base`), and trained on with them (the round's pair rows get
their prompt's images in memory; the files name them). The dpokit engine only. Offline rows mixed in
(``online.offline_fraction``) carry whatever images their data file gives them: the round's ``offline.jsonl``
names them, training gets them read from that file, and they are tokenized with the policy's processor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpokit.config import TrainConfig, validate_config
from dpokit.data.prompts import PromptRow, read_prompt_rows
from dpokit.errors import ConfigError, DpokitError, TrainingError
from dpokit.generation.engines import SamplingEngine, VllmEngine, engine_logp_gap
from dpokit.online import labelling
from dpokit.online.metrics import generation_metrics, judge_metrics, plot_rounds
from dpokit.online.pairs import DROP_REASONS, build_rows
from dpokit.online.prompts import round_prompt_indices
from dpokit.online.records import STAGES, DamagedRoundFile, RoundFiles, set_aside_rounds_after
from dpokit.rundir import RunPaths
from dpokit.training.reference import CopyReference
from dpokit.training.splits import Split, prepare_with_config
from dpokit.training.trainer import DataSource, OnStep, RunResult, Segment, Trainer, run_loop

REFERENCE_WEIGHTS = "reference.safetensors"
# Nats per token between an engine's log-probs and the policy's above which a round warns: float32 on CPU
# differs by about 1e-6, bfloat16 kernels by up to about 1e-2; a missed weight update by far more.
LOGP_GAP_WARNING = 0.05
RowsCheck = Callable[[list[dict[str, Any]]], str | None]  # what is wrong with a stage file's rows (None: nothing)
logger = logging.getLogger(__name__)


@dataclass
class OnlineResult(RunResult):
    """What an online run produced: a run's result and its per-round records."""

    rounds: list[dict[str, Any]] = field(default_factory=list)  # the per-round records (metrics.jsonl, split "round")

    def round_dir(self, round_index: int) -> Path:
        """Where round ``round_index``'s files are."""
        return RunPaths(self.run_dir).round(round_index)


def run_online(
    cfg: TrainConfig, *, resume: str | None = None, overwrite: bool = False, on_step: OnStep | None = None
) -> OnlineResult:
    """Run ``cfg``'s online rounds (``cfg.online``); ``resume``/``overwrite``/``on_step`` as in
    :func:`dpokit.training.run`. Under torchrun every process calls this with the same arguments."""
    cfg = online_config(cfg)
    # A bad prompts file fails first; rows with images are for a vision-language policy (encoding them checks that).
    prompts = read_prompt_rows(cfg.online.prompts_path, cfg.online.prompt_split, images=True)
    result = run_loop(
        cfg,
        check=lambda config: config,  # online_config checked it
        loop=lambda trainer: OnlineLoop(trainer, prompts),
        data=heldout_data(cfg),
        needs_whole_model=(
            "dpokit online samples from the policy on every process: use distributed.strategy=ddp, not fsdp, and "
            "distributed.sequence_parallel=1"
        ),
        resume=resume,
        overwrite=overwrite,
        on_step=on_step,
    )
    from dpokit.training.tracking import read_metrics

    found = RunPaths(result.run_dir).metrics.is_file()
    return OnlineResult(**vars(result), rounds=read_metrics(result.run_dir, split="round") if found else [])


def heldout_data(cfg: TrainConfig) -> DataSource:
    """The trainer's data for an online run: no training split yet (each round brings its own), and the
    held-out pairs of ``online.heldout_path`` (else ``data.eval_path``), if any."""

    def source(tokenizer: Any, unpaired: bool) -> tuple[Split, Split | None]:
        d = cfg.data
        path = cfg.online.heldout_path or d.eval_path
        heldout = None
        if path:
            from dpokit.models import load_processor

            processor = load_processor(cfg.model)  # a vision-language policy's, for held-out pairs with images
            prepared = prepare_with_config(d, path, tokenizer, split=d.eval_split, unpaired=unpaired, processor=processor)
            heldout = Split(prepared, list(range(len(prepared)))[: cfg.eval.max_examples])
        return Split.of_items([]), heldout

    return source


def online_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` checked for an online run, with the step plan (``optim.max_steps = rounds x steps_per_round``)
    and a concrete reference strategy filled in."""
    from dpokit.losses import build_objective
    from dpokit.training.reference import resolve_reference_strategy

    validate_config(cfg)
    on = cfg.online
    missing = [k for k, v in (("model.name_or_path", cfg.model.name_or_path), ("online.prompts_path", on.prompts_path)) if not v]
    if on.offline_fraction > 0 and not cfg.data.train_path:
        missing.append("data.train_path (online.offline_fraction > 0 mixes in its labelled pairs)")
    if missing:
        raise ConfigError(f"missing required config key(s) for dpokit online: {', '.join(missing)}")
    total = on.rounds * on.steps_per_round
    if cfg.optim.max_steps is not None and cfg.optim.max_steps != total:
        raise ConfigError(
            f"optim.max_steps={cfg.optim.max_steps} but an online run trains online.rounds x online.steps_per_round = "
            f"{total} steps; leave optim.max_steps unset (null)"
        )
    objective = build_objective(cfg.loss.terms, beta=cfg.loss.beta, reference_free=cfg.loss.reference_free)
    pairwise = [t.spec.name for t in objective.terms if t.spec.kind == "pairwise"]
    if on.pairs == "ranking" and cfg.data.ranked_mode == "listwise" and pairwise:
        raise ConfigError(
            f"online.pairs=ranking trains on whole rankings, but loss {', '.join(pairwise)} compares two responses: use "
            "loss.terms=[{name: plackett_luce}], or expand the rankings with data.ranked_mode (all_pairs, best_vs_worst, ...)"
        )
    if cfg.reference.strategy == "precomputed":
        raise ConfigError(
            "reference.strategy=precomputed cannot serve dpokit online: every round trains on new completions, which a "
            "table computed before training does not hold; use copy, adapter_disabled or auto"
        )
    strategy = resolve_reference_strategy(
        cfg.reference.strategy,
        needs_reference=objective.needs_reference,
        lora=cfg.model.lora.enabled,
        mismatched_pairs=objective.needs_kl,
    )
    if strategy == "precomputed":  # what 'auto' may choose for offline training
        strategy = "adapter_disabled" if cfg.model.lora.enabled else "copy"
    if on.reference == "refresh" and (strategy != "copy" or cfg.model.lora.enabled):
        raise ConfigError(
            "online.reference=refresh copies the policy into the reference each round: it needs reference.strategy=copy "
            f"and full fine-tuning (got reference strategy {strategy}{', LoRA' if cfg.model.lora.enabled else ''})"
        )
    labelling.check_labelling(cfg, strategy)
    return dataclasses.replace(
        cfg,
        optim=dataclasses.replace(cfg.optim, max_steps=total),
        reference=dataclasses.replace(cfg.reference, strategy=strategy),  # type: ignore[arg-type]
    )


class OnlineLoop:
    """One online run as a :class:`~dpokit.training.trainer.Loop` of the trainer: each round is a segment
    of ``online.steps_per_round`` steps on the pairs made, just before it, from the policy's samples and
    the judge's scores. Holds the prompts and the labeller (rank 0)."""

    def __init__(self, trainer: Trainer, prompts: list[PromptRow]) -> None:
        self.trainer, self.prompts = trainer, prompts
        self.cfg, self.ctx, self.on = trainer.cfg, trainer.ctx, trainer.cfg.online
        self.run_dir, self.paths = trainer.run_dir, trainer.run_directory.paths
        self.labeller: labelling.Labeller | None = None
        self.offline: list[dict[str, Any]] | None = None
        self.offline_images: dict[str, list[bytes]] = {}  # an offline row's images by its source (file and line)
        self.remade: set[str] = set()  # the stages of the current round made afresh (not read from their files)
        self.engine: SamplingEngine | None = None  # built at the first sampling (online.sampling.engine)
        self.sync_s: float | None = None  # seconds the last weight sync to the engine took (None: none needed)
        # The current round's sampled ids: prompt ids by prompt, token ids by (prompt, sample); None for a
        # round whose completions file predates token ids (its rows are then tokenized from text).
        self.sampled: tuple[dict[int, list[int]], dict[tuple[int, int], list[int]]] | None = None
        self.images: list[list[bytes]] | None = None  # the current round's prompts' images (None: no prompt has any)

    # -- the loop: the trainer's segments -----------------------------------------------------------

    def segments(self, trainer: Trainer) -> Iterator[Segment]:
        """Round after round from where the run stands (a resume continues the round it stopped in, with
        the same rows); a round resumed at its very end that was not yet recorded is recorded first."""
        spr = self.on.steps_per_round
        first_round, done_in_round = divmod(trainer.position.step, spr)
        if trainer.resume_from is not None:
            self.continue_rounds(first_round, done_in_round)
            if done_in_round == 0 and first_round > 0 and not self.logged(first_round - 1):
                self.finish_round(first_round - 1, training_s=math.nan)
        for r in range(first_round, self.on.rounds):
            resuming_inside = r == first_round and done_in_round > 0
            self.reference_for_round(r, restore=resuming_inside)
            rows = self.round_rows(r, started=resuming_inside)
            yield Segment(
                end_step=(r + 1) * spr,
                split=self.training_split(r, rows),
                keep_position=resuming_inside,
                state={"online": {"round": r, "round_start_step": r * spr, "steps_per_round": spr}},
                index=r,
            )

    def after_segment(self, trainer: Trainer, segment: Segment, seconds: float) -> None:
        self.finish_round(segment.index, training_s=seconds)

    def continue_rounds(self, first_round: int, done_in_round: int) -> None:
        """A resume at round ``first_round``: later rounds' files belong to an abandoned branch."""
        if self.ctx.is_main:
            for moved in set_aside_rounds_after(self.run_dir, first_round):
                self.trainer.say(f"round files after round {first_round} belong to the abandoned branch; moved to {moved}")
        self.trainer.say(f"continuing online round {first_round} after {done_in_round} of its {self.on.steps_per_round} steps")
        self.ctx.barrier()

    def logged(self, round_index: int) -> bool:
        from dpokit.training.tracking import read_metrics

        found = None
        if self.ctx.is_main:
            found = self.paths.metrics.is_file() and any(
                r.get("round") == round_index for r in read_metrics(self.run_dir, split="round")
            )
        return bool(self.ctx.broadcast_object(found))

    # -- one round's data ---------------------------------------------------------------------------

    def round_rows(self, r: int, *, started: bool = False) -> list[dict[str, Any]]:
        """Round ``r``'s training rows: every stage read from its file when written and intact, else done and
        written. ``started``: the round has trained on its rows already (a resume inside it), so a damaged
        completions or judgments file cannot be made again from the weights that made it: the run stops."""
        files = RoundFiles(self.run_dir, r)
        self.remade = set()
        indices = round_prompt_indices(len(self.prompts), self.on.prompts_per_round, seed=self.cfg.optim.seed, round_index=r)
        prompts = [self.prompts[i].prompt for i in indices]
        images = [list(self.prompts[i].images) for i in indices]
        self.images = images if any(images) else None
        if self.ctx.is_main:
            self.repair_summary(files)
            self.write_prompts(files, indices)
        grid = [(p, k) for p in range(len(prompts)) for k in range(self.on.samples_per_prompt)]
        completions = self.stage(
            files,
            "completions",
            lambda: self.sample(r, prompts),
            collective=True,
            check=lambda rows: completions_problem(rows, grid),
            redo=not started,
        )
        self.sampled = self.sampled_of(prompts, completions)
        scores = self.stage(
            files,
            "judgments",
            lambda: self.judge(r, prompts, completions),
            check=lambda rows: judgments_problem(rows, completions),
            redo=not started,
            stale="completions" in self.remade,
        )

        def make_pairs() -> tuple[list[dict[str, Any]], dict[str, Any]]:
            return self.pairs(prompts, completions, scores)

        pairs: list[dict[str, Any]] = self.stage(files, "pairs", make_pairs, check=lambda rows: differs(rows, make_pairs))
        return pairs + self.offline_rows(files, r, len(pairs))

    def stage(
        self,
        files: RoundFiles,
        name: str,
        make: Any,
        *,
        collective: bool = False,
        check: RowsCheck | None = None,
        redo: bool = True,
        stale: bool = False,
    ) -> Any:
        """A stage's rows: read by rank 0 from its file when there and intact (``check(rows)`` says what is
        wrong with them, None when nothing), else made (by every rank when ``collective``, else by rank 0)
        and written by rank 0; broadcast to every rank. A damaged file is set aside and made again when
        ``redo``, else the run stops naming it; a ``stale`` file (made from rows made again since) is redone."""
        outcome: Any = self.reuse(files, name, check, redo=redo, stale=stale) if self.ctx.is_main else None
        present = self.ctx.broadcast_object(outcome is not None if self.ctx.is_main else None)
        if not present and (collective or self.ctx.is_main):
            try:
                made, info = make()
                if self.ctx.is_main:
                    files.write(name, made, info)
                outcome = ("ok", made)
                self.remade.add(name)
            except labelling.JudgeFailed as error:
                outcome = ("judge failed", str(error))
            except DpokitError as error:  # every rank stops with rank 0's message, none waits for it
                outcome = (type(error).__name__, str(error))
        outcome = self.ctx.broadcast_object(outcome)
        if outcome[0] not in ("ok", "judge failed"):
            raise (ConfigError if outcome[0] == "ConfigError" else TrainingError)(outcome[1])
        if outcome[0] == "judge failed":
            checkpoint = self.trainer.checkpoint()
            raise TrainingError(
                f"{outcome[1]}. Stopped with a checkpoint, {checkpoint} (round {files.round_index}, before its training; the "
                f"round's prompts and completions are kept in {files.path}). Bring the judge back, then continue with "
                "--resume latest: nothing already sampled is sampled again"
            )
        rows: list[dict[str, Any]] = outcome[1]
        return rows if name != "judgments" else [row["score"] for row in rows]

    def reuse(self, files: RoundFiles, name: str, check: RowsCheck | None, *, redo: bool, stale: bool) -> tuple[str, Any] | None:
        """Rank 0: ``("ok", rows)`` of an intact stage file; None when there is none (or it was set aside to be
        made again); ``("TrainingError", message)`` when it is damaged and cannot be made again."""
        if not files.has(name):
            return None
        if stale:
            moved = files.set_aside(f"{name}.jsonl")
            logger.warning("%s was made from files made again since; moved to %s and made again", files.file(name), moved)
            return None
        try:
            rows = files.read_checked(name)
            problem = check(rows) if check is not None else None
            problem = None if problem is None else f"{files.file(name)}: {problem}"
        except DamagedRoundFile as error:
            problem = str(error)
        if problem is None:
            return ("ok", rows)
        if redo:
            moved = files.set_aside(f"{name}.jsonl")
            logger.warning("%s; moved to %s and made again", problem, moved)
            return None
        r, spr = files.round_index, self.on.steps_per_round
        return (
            "TrainingError",
            f"{problem}. Round {r} has already trained on it, and the weights that made it are gone: restore the file, or "
            f"resume from the checkpoint at the round's start (--resume {self.paths.checkpoint(r * spr)}, when kept), "
            "which makes the round again",
        )

    def repair_summary(self, files: RoundFiles) -> None:
        """Rank 0: an unreadable ``round.json`` is set aside and rebuilt from the stage files that can be read
        (their counts and metrics; the stage timings are lost). The stage files are checked when read."""
        try:
            files.summary()
            return
        except DamagedRoundFile as error:
            moved = files.set_aside("round.json")
            logger.warning("%s; moved to %s and rebuilt from the round's stage files", error, moved)
        summary: dict[str, Any] = {"round": files.round_index, "stages": [], "rebuilt": True}
        for stage in (*STAGES, "offline"):
            try:
                rows = files.read(stage) if files.has(stage) else None
            except DamagedRoundFile:
                rows = None  # found again, and handled, when the stage is read
            if rows is None:
                continue
            info: dict[str, Any] = {"rows": len(rows), stage: len(rows)}
            if stage == "completions":
                info.update(generation_metrics(rows, math.nan))
            elif stage == "judgments":
                info = {"rows": len(rows), **judge_metrics([row.get("score") for row in rows], math.nan)}
            summary["stages"].append(stage)
            summary[stage] = info
        files.write_summary(summary)

    def write_prompts(self, files: RoundFiles, indices: list[int]) -> None:
        """Rank 0: the round's prompts file, (re)written unless it holds exactly the round's prompts."""
        rows = [
            {"prompt_index": k, "source_index": i, "where": self.prompts[i].where, "prompt": self.prompts[i].prompt}
            | ({"images": list(self.prompts[i].image_names)} if self.prompts[i].images else {})
            for k, i in enumerate(indices)
        ]
        if files.has("prompts"):
            try:
                problem = differs(files.read_checked("prompts"), lambda: (rows, {}))
                problem = None if problem is None else f"{files.file('prompts')}: {problem}"
            except DamagedRoundFile as error:
                problem = str(error)
            if problem is None:
                return
            moved = files.set_aside("prompts.jsonl")
            logger.warning("%s; moved to %s and written again", problem, moved)
        files.write("prompts", rows, {"prompts": len(rows)})

    def sample(self, r: int, prompts: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """K completions of every prompt from the current policy (this rank's share; gathered), by the
        configured engine. Each record keeps the sampled ``token_ids`` (what training uses) and the text
        (what the judge reads); ``policy_logp`` / ``reference_logp`` are teacher-forced here, whichever engine sampled."""
        from dpokit.generation import SamplingConfig
        from dpokit.generation.engines import policy_logps

        t, s = self.trainer, self.on.sampling
        started = time.perf_counter()
        local = self.ctx.rank_slice(list(range(len(prompts))))
        images = None if self.images is None else [self.images[i] for i in local]
        ids = self.prompt_ids([prompts[i] for i in local], images)
        seed = (self.cfg.optim.seed * 1_000_003 + r * 7_919_993 + (local[0] if local else 0)) % 2**62
        sampling = SamplingConfig(s.max_new_tokens, s.temperature, s.top_p, s.top_k, self.on.samples_per_prompt, seed)
        engine = self.sampling_engine(r)
        completions = (engine.sample(ids, sampling) if images is None else engine.sample(ids, sampling, images)) if ids else []
        prompt_ids, outputs = [ids[c.prompt_index] for c in completions], [c.token_ids for c in completions]
        scoring: dict[str, Any] = {"tokenizer": t.parts.tokenizer, "batch_size": s.batch_size}
        if images is not None:
            image_processor = getattr(t.parts.processor, "image_processor", None)
            scoring.update(images=[images[c.prompt_index] for c in completions], image_processor=image_processor)
        policy = policy_logps(t.parts.runner.model, prompt_ids, outputs, **scoring)
        reference: list[float | None] = [None] * len(completions)
        with t.parts.train_reference.sampling_model() as reference_model:
            if reference_model is not None and completions:
                reference = list(policy_logps(reference_model, prompt_ids, outputs, **scoring))
        records = [
            {
                "prompt_index": local[c.prompt_index],
                "sample_index": c.sample_index,
                "rank": self.ctx.rank,
                "completion": c.text,
                "num_tokens": len(c.content_ids),
                "stopped": c.stopped,
                "policy_logp": logp,
                "reference_logp": ref,
                "token_ids": c.token_ids,
            }
            for c, logp, ref in zip(completions, policy, reference, strict=True)
        ]
        gap = engine_logp_gap(completions, policy)
        gathered = self.ctx.all_gather_object((records, time.perf_counter() - started, gap))
        merged = sorted(
            (row for part, _, _ in gathered for row in part), key=lambda row: (row["prompt_index"], row["sample_index"])
        )
        seconds = max(elapsed for _, elapsed, _ in gathered)
        info: dict[str, Any] = {"completions": len(merged), "engine": engine.name, **generation_metrics(merged, seconds)}
        gaps = [g for _, _, g in gathered if g is not None]
        if gaps:
            info["engine/logp_gap_per_token"] = max(gaps)
            if max(gaps) > LOGP_GAP_WARNING:
                logger.warning(
                    "round %d: the %s engine's log-probs differ from the policy's by up to %.3g nats per token; it may not "
                    "be sampling from the current weights (see docs/vllm.md, weight sync)",
                    r,
                    engine.name,
                    max(gaps),
                )
        if self.sync_s is not None:
            info["engine/sync_s"] = self.sync_s
        return merged, info

    def sampled_of(
        self, prompts: list[Any], completions: list[dict[str, Any]]
    ) -> tuple[dict[int, list[int]], dict[tuple[int, int], list[int]]] | None:
        """The round's prompt ids and sampled token ids (None when a completion record has no ``token_ids``:
        a completions file written before they were kept, whose rows are then tokenized from their text)."""
        if any(not isinstance(c.get("token_ids"), list) for c in completions):
            logger.warning("the round's completions carry no token ids (an older run); training on their re-tokenized text")
            return None
        tokens = {(int(c["prompt_index"]), int(c["sample_index"])): [int(t) for t in c["token_ids"]] for c in completions}
        return dict(enumerate(self.prompt_ids(prompts, self.images))), tokens

    def prompt_ids(self, prompts: list[Any], images: list[list[bytes]] | None = None) -> list[list[int]]:
        """The token ids the policy is prompted with (and trained after): formatted, encoded (each image as its
        tokens, with the policy's processor) and cut to ``data.max_prompt_length`` as ``data.truncation_mode``
        says. A prompt with images is never cut (its image tokens must stay whole): a longer one is an error."""
        from dpokit.generation import encode_prompts

        d = self.cfg.data
        processor = self.trainer.parts.processor if images is not None else None
        _, ids = encode_prompts(self.trainer.parts.tokenizer, prompts, images=images, processor=processor)
        limit = d.max_prompt_length
        if images is not None:
            too_long = next((i for i, x in enumerate(ids) if len(x) > limit), None)
            if too_long is not None:
                raise ConfigError(
                    f"an online prompt with images is {len(ids[too_long])} tokens (image tokens included), more than "
                    f"data.max_prompt_length={limit}; raise it (image tokens are never cut)"
                )
            return ids
        return [x[-limit:] if d.truncation_mode == "keep_end" else x[:limit] for x in ids]

    def sampling_engine(self, r: int) -> SamplingEngine:
        """The configured engine, given the current policy first (a vLLM server loads it: :mod:`dpokit.online.sync`)."""
        if self.engine is None:
            from dpokit.generation import build_engine

            s, t = self.on.sampling, self.trainer
            self.engine = build_engine(
                s.engine,
                model=t.parts.runner.model,
                tokenizer=t.parts.tokenizer,
                processor=t.parts.processor,
                url=s.url,
                api_key_env=s.api_key_env,
                batch_size=s.batch_size,
            )
        self.sync_s = None
        if isinstance(self.engine, VllmEngine):
            from dpokit.online.sync import sync_policy

            self.sync_s = sync_policy(self.engine, self.trainer, self.paths.round(r))
        return self.engine

    def judge(self, r: int, prompts: list[Any], completions: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One score per completion (rank 0), retried; an implicit reward of 0 everywhere stops the run."""
        if self.labeller is None:
            self.labeller = labelling.load_labeller(self.cfg, str(self.ctx.device))
        started = time.perf_counter()
        where = f"online round {r}"
        scores = labelling.label_with_retries(
            self.labeller,
            [prompts[c["prompt_index"]] for c in completions],
            completions,
            retries=self.on.judge_retries,
            wait_s=self.on.judge_retry_wait_s,
            where=where,
            images=None if self.images is None else [self.images[c["prompt_index"]] for c in completions],
        )
        labelling.check_rewards(self.labeller, scores, where)
        rows = [
            {"prompt_index": c["prompt_index"], "sample_index": c["sample_index"], "score": None if not math.isfinite(s) else s}
            for c, s in zip(completions, scores, strict=True)
        ]
        return rows, {"judge": self.labeller.spec, **judge_metrics(scores, time.perf_counter() - started)}

    def pairs(
        self, prompts: list[Any], completions: list[dict[str, Any]], scores: list[float | None]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        k = self.on.samples_per_prompt
        texts = [[c["completion"] for c in completions[i * k : (i + 1) * k]] for i in range(len(prompts))]
        values = [[math.nan if s is None else s for s in scores[i * k : (i + 1) * k]] for i in range(len(prompts))]
        stopped = [[bool(c["stopped"]) for c in completions[i * k : (i + 1) * k]] for i in range(len(prompts))]
        lengths = [[int(c["num_tokens"]) for c in completions[i * k : (i + 1) * k]] for i in range(len(prompts))]
        rows, report = build_rows(
            prompts,
            texts,
            values,
            mode=self.on.pairs,
            min_margin=self.on.min_margin,
            stopped=stopped,
            missing_eos_penalty=self.on.missing_eos_penalty,
            lengths=lengths,
            prefer_shorter_within=self.on.prefer_shorter_within,
        )
        # Every reason, 0 when nothing was dropped for it: a round's record has the same fields whatever was sampled.
        info = {"pairs": report.rows, **{f"pairs/dropped_{reason}": report.dropped[reason] for reason in DROP_REASONS}}
        if self.on.prefer_shorter_within is not None:
            info["pairs/shorter_chosen"] = report.shorter_chosen
        return rows, info

    def offline_rows(self, files: RoundFiles, r: int, num_online: int) -> list[dict[str, Any]]:
        """``offline_fraction`` of the round's rows drawn from data.train_path's labelled pairs (seeded by round)."""
        fraction = self.on.offline_fraction
        if fraction <= 0:
            return []

        def make() -> tuple[list[dict[str, Any]], dict[str, Any]]:
            pool = self.offline_pool()
            wanted = round(fraction * num_online / (1 - fraction))
            order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.cfg.optim.seed * 31 + r)).tolist()
            rows = [pool[order[i % len(pool)]] for i in range(wanted)]
            return rows, {"offline": len(rows)}

        rows: list[dict[str, Any]] = self.stage(files, "offline", make, check=lambda stored: differs(stored, make))
        return rows

    def offline_pool(self) -> list[dict[str, Any]]:
        if self.offline is None:
            from dpokit.data import read_preferences

            d = self.cfg.data
            examples, _ = read_preferences(
                d.train_path, format=d.format, columns=d.columns, split=d.train_split, skip_invalid=d.skip_invalid
            )
            self.offline = [
                {
                    "prompt": e.prompt,
                    "responses": e.responses,
                    **({"scores": e.scores} if e.scores else {}),
                    **({"truncated": e.truncated} if e.truncated else {}),
                    **({"images": list(e.image_names or [])} if e.images else {}),  # named in the file; bytes in memory
                    "source": e.source,
                }
                for e in examples
            ]
            self.offline_images = {e.source: list(e.images) for e in examples if e.images}
        return self.offline

    # -- training data, reference, metrics ----------------------------------------------------------

    def training_split(self, r: int, rows: list[dict[str, Any]]) -> Split:
        if not rows:
            raise TrainingError(
                f"online round {r}: no preference pairs (every prompt's completions tied, were empty or were unscored; see "
                f"{self.paths.round(r) / 'round.json'}); sample more (online.samples_per_prompt, a higher "
                "online.sampling.temperature) or lower online.min_margin"
            )
        pictured = self.images is not None or any("images" in row for row in rows)
        if pictured:
            if self.sampled is None:
                raise ConfigError(
                    f"online round {r}: rows with images train from the sampled token ids only, and the round's "
                    "completions file has none (written by an older version); delete the round's directory to sample it again"
                )
            rows = [self.row_with_images(row) for row in rows]
        if self.sampled is not None:  # the completions as the ids that were sampled
            from dpokit.online.sampled import prepare_round

            parts = self.trainer.parts
            prepared = prepare_round(
                rows,
                *self.sampled,
                parts.tokenizer,
                self.cfg.data,
                unpaired=parts.objective.unpaired,
                processor=parts.processor if pictured else None,
            )
        else:
            prepared = prepare_with_config(
                self.cfg.data,
                rows,
                self.trainer.parts.tokenizer,
                unpaired=self.trainer.parts.objective.unpaired,
                format="ranked",  # the round's rows, written by this loop: no renames, nothing to skip, no cache
                columns=None,
                skip_invalid=False,
                use_cache=False,
            )
        if len(prepared) == 0:
            raise TrainingError(f"online round {r}: no training examples left after tokenization: {prepared.report.summary()}")
        return Split(prepared, list(range(len(prepared))))

    def row_with_images(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` with its prompt's images as bytes (for the data reader and the image table): an online row
        gets its round prompt's, an offline row those its data file gave it (the round's files name them)."""
        if "sample_indices" in row:
            return row if self.images is None else {**row, "images": self.images[int(row["prompt_index"])]}
        if "images" not in row:
            return row
        if not self.offline_images:
            self.offline_pool()
        images = self.offline_images.get(str(row.get("source")))
        if images is None:
            raise TrainingError(
                f"an offline row of the round names images but its source {row.get('source')!r} is no row with images of "
                f"data.train_path={self.cfg.data.train_path} (the data file changed since the round was written?)"
            )
        return {**row, "images": images}

    def reference_for_round(self, r: int, *, restore: bool) -> None:
        """``online.reference=refresh``: the policy at the round's start becomes the reference (saved in the
        round's directory, so a resume inside the round gets it back)."""
        if self.on.reference != "refresh":
            return
        from safetensors.torch import load_file, save_file

        reference = self.trainer.parts.train_reference
        if not isinstance(reference, CopyReference):  # online_config allows refresh with a copy only
            raise ConfigError(f"online.reference=refresh needs a copied reference model, got {type(reference).__name__}")
        path = self.paths.round(r) / REFERENCE_WEIGHTS
        if restore:
            reference.model.load_state_dict(load_file(str(path)))
            return
        state = {k: v.detach().clone().contiguous() for k, v in self.trainer.parts.runner.model.state_dict().items()}
        reference.model.load_state_dict(state)
        if self.ctx.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").replace(path)
            if r > 0:
                self.paths.round(r - 1).joinpath(REFERENCE_WEIGHTS).unlink(missing_ok=True)
        self.ctx.barrier()

    def finish_round(self, r: int, *, training_s: float) -> None:
        """The round's record: its stages' metrics, the training time and the held-out evaluation."""
        t = self.trainer
        heldout = t.evaluation_at_this_step()
        if not self.ctx.is_main:
            return
        try:
            summary = RoundFiles(self.run_dir, r).summary()
        except DamagedRoundFile as error:  # the round trained already; only its record is incomplete
            logger.warning("%s; round %d's record lacks its stage metrics", error, r)
            summary = {}
        record: dict[str, Any] = {"round": r}
        for stage in ("completions", "judgments", "pairs", "offline"):
            record.update({k: v for k, v in summary.get(stage, {}).items() if k not in ("written", "judge", "engine")})
        record["time/training_s"] = training_s
        record.update({f"heldout/{k}": v for k, v in heldout.items()})
        t.tracker.log(t.position.step, record, split="round")
        t.say(round_line(record, heldout))
        if self.cfg.logging.plot:
            t.tracker.flush()
            try:
                plot_rounds(self.paths.metrics, self.paths.rounds_plot)
            except Exception as error:  # a plot must never stop the run
                t.say(f"could not draw {self.paths.rounds_plot}: {error}")


def completions_problem(rows: list[dict[str, Any]], grid: list[tuple[int, int]]) -> str | None:
    """What is wrong with a round's completions rows (None: they are one per (prompt, sample) of ``grid``)."""
    found = [(row.get("prompt_index"), row.get("sample_index")) for row in rows]
    if found != grid:
        return f"{len(rows)} completions for {len(grid)} (prompt, sample) slots, or out of order (a row was lost?)"
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("completion"), str) or not isinstance(row.get("stopped"), bool):
            return f"row {number}: 'completion' must be a string and 'stopped' true/false"
    return None


def judgments_problem(rows: list[dict[str, Any]], completions: list[dict[str, Any]]) -> str | None:
    """What is wrong with a round's judgments rows (None: one score, a number or null, per completion)."""
    found = [(row.get("prompt_index"), row.get("sample_index")) for row in rows]
    if found != [(c["prompt_index"], c["sample_index"]) for c in completions]:
        return f"{len(rows)} judgments for {len(completions)} completions, or out of order (a row was lost?)"
    for number, row in enumerate(rows, start=1):
        score = row.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            return f"row {number}: score {score!r} is not a number"
    return None


def differs(rows: list[dict[str, Any]], make: Callable[[], tuple[list[dict[str, Any]], Any]]) -> str | None:
    """None when ``rows`` are exactly what ``make()`` makes (pairs, offline rows and prompts are made again
    from the round's other files to check them), else what differs."""
    made = make()[0]
    if json.dumps(rows, sort_keys=True) == json.dumps(made, sort_keys=True):
        return None
    return f"{len(rows)} rows differ from the {len(made)} the round's other files make (a row was lost or changed)"


def round_line(record: dict[str, Any], heldout: dict[str, float]) -> str:
    """The one line a finished round prints."""

    def value(name: str) -> float:
        number = record.get(name, math.nan)
        return float(number) if isinstance(number, (int, float)) else math.nan

    line = (
        f"round {record['round']}: judge score {value('judge/score_mean'):.4g} +/- {value('judge/score_std'):.3g}, "
        f"{record.get('pairs', 0)} pairs, KL {value('kl'):.4g}, EOS rate {value('completion/eos_rate'):.2f}"
    )
    if "rewards/accuracies" in heldout:
        line += f", held-out accuracy {heldout['rewards/accuracies']:.3f}"
    return line
