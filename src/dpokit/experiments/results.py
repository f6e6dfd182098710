"""What the experiments measure and keep: typed reward-KL points, the store of finished runs' results, and
the evaluation of a run directory's checkpoints on the frontier -- one of each, for every experiment.

* :class:`FrontierPoint` -- one model's mean ground-truth reward and KL to the reference, as
  :mod:`dpokit.analysis.frontier` draws and tabulates it (``to_dict``/``from_dict`` are the JSON form
  of ``results.json`` and of the store).
* :class:`ResultStore` -- each finished run's points (and the samples and round statistics that go with
  them) under ``<out>/points/<run>.json``, valid for one settings key, so an interrupted experiment
  picks up where it stopped and a change of settings runs again.
* :class:`FrontierEvaluation` -- the reference model, prompts, reward and sampling of one experiment's
  estimates; :meth:`~FrontierEvaluation.checkpoints` evaluates every checkpoint of a run directory on
  the reference model's device.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpokit.analysis.frontier import CheckpointServer, FrontierPoint, estimate_reward_kl, find_checkpoints
from dpokit.scoring import RewardFn

Sample = dict[str, Any]  # one evaluation sample: prompt, completion, reward, kl (online: and prompt_index)
Log = Callable[[str], None]


@dataclass(frozen=True)
class StoredRun:
    """A finished run's results: its points, the seconds it took, the kept samples of its last evaluated
    model, for an online run each round's statistics, and any further per-checkpoint measurements
    (``measures``: the over-optimisation experiment's rows)."""

    points: list[FrontierPoint]
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    measures: list[dict[str, Any]] = field(default_factory=list)


class ResultStore:
    """Finished runs' results in ``directory/<run>.json``, each valid for the settings ``key`` it was stored
    under: ``{"settings_key", "points", "seconds", "samples", "rounds", "measures"}`` (a file without
    ``rounds`` or ``measures``, as the experiments stored before, reads as none). A file stored under other settings is not
    used, nor is an unreadable one (with the reason logged): the run is done again and the file replaced."""

    def __init__(self, directory: str | Path, key: str, log: Log | None = None) -> None:
        self.directory = Path(directory)
        self.key = key
        self.log = log or (lambda line: None)

    def path(self, run: str) -> Path:
        return self.directory / f"{run}.json"

    def load(self, run: str) -> StoredRun | None:
        """The stored results of ``run`` under this store's key, or None."""
        path = self.path(run)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("settings_key") != self.key:
                return None
            return StoredRun(
                points=[FrontierPoint.from_dict(p) for p in data["points"]],
                seconds=float(data["seconds"]),
                samples=list(data["samples"]),
                rounds=list(data.get("rounds", [])),
                measures=list(data.get("measures", [])),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            self.log(f"{path}: unreadable stored results ({type(error).__name__}: {error}); running {run} again")
            return None

    def save(self, run: str, stored: StoredRun) -> None:
        """Store ``run``'s results under this store's key (written whole: an interruption leaves no torn file)."""
        payload = {
            "settings_key": self.key,
            "points": [p.to_dict() for p in stored.points],
            "seconds": stored.seconds,
            "samples": stored.samples,
            "rounds": stored.rounds,
            "measures": stored.measures,
        }
        path = self.path(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        partial.replace(path)


@dataclass(frozen=True)
class FrontierEvaluation:
    """What every reward-KL estimate of one experiment shares: the reference (SFT) model and its tokenizer,
    the evaluation prompts, the ground-truth reward and the sampling (``samples_per_prompt`` completions
    of at most ``max_new_tokens`` tokens per prompt, with one ``seed`` for every model, so sample i of
    any two models answers the same prompt). ``server``: a vLLM server serving the reference that draws the
    samples instead (``--engine vllm``; each policy is loaded into it from its directory, and the seed does
    not apply), the log-probs of the KL still computed here."""

    reference: torch.nn.Module
    tokenizer: Any
    prompts: Sequence[str]
    reward_fn: RewardFn
    samples_per_prompt: int
    max_new_tokens: int
    seed: int
    server: CheckpointServer | None = None

    @property
    def device(self) -> str:
        """The reference model's device: policies are loaded beside it."""
        return str(next(self.reference.parameters()).device)

    def estimate(
        self,
        policy: torch.nn.Module,
        *,
        method: str,
        run: str,
        step: int,
        beta: float | None = None,
        keep_samples: int = 0,
        path: str | Path | None = None,
    ) -> tuple[FrontierPoint, list[Sample]]:
        """``policy``'s point and its first ``keep_samples`` samples; ``path``: the directory ``policy`` was
        loaded from (None: it is the reference), which a vLLM ``server`` loads to sample it."""
        engine = None
        if self.server is not None:
            if path is None:
                self.server.restore()
            engine = self.server.engine if path is None else self.server.serve(path, f"{run}-step-{step}")
        estimate = estimate_reward_kl(
            policy,
            self.reference,
            self.tokenizer,
            self.prompts,
            self.reward_fn,
            num_samples=self.samples_per_prompt,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            keep_samples=keep_samples,
            engine=engine,
        )
        samples = estimate.pop("samples", [])
        return FrontierPoint.from_estimate(estimate, method=method, run=run, step=step, beta=beta), samples

    def checkpoints(
        self,
        run_dir: str | Path,
        *,
        method: str,
        run: str,
        beta: float | None = None,
        step_offset: int = 0,
        keep_samples: int = 0,
        log: Log | None = None,
    ) -> tuple[list[FrontierPoint], list[Sample]]:
        """Every checkpoint of ``run_dir`` that has a step (a final export without one is left out), loaded
        on the reference's device: the points in step order (steps + ``step_offset``) and the first
        ``keep_samples`` samples of the last checkpoint."""
        from dpokit.models import LoadOptions, load_policy

        say = log or (lambda line: None)
        checkpoints = [(step, path) for step, path in find_checkpoints(run_dir) if step is not None]
        points: list[FrontierPoint] = []
        samples: list[Sample] = []
        for index, (step, path) in enumerate(checkpoints):
            last = index == len(checkpoints) - 1
            policy = load_policy(path, LoadOptions(dtype="float32", device=self.device)).model
            point, kept = self.estimate(
                policy,
                method=method,
                run=run,
                step=step + step_offset,
                beta=beta,
                keep_samples=keep_samples if last else 0,
                path=path,
            )
            points.append(point)
            samples = kept if last else samples
            say(f"  {run} step {point.step}: reward {point.reward_mean:.3f}  KL {point.kl_mean:.2f}")
        return points, samples


def remove_checkpoints(run_dir: str | Path, keep_steps: Collection[int] = ()) -> None:
    """Delete the checkpoints of ``run_dir`` once evaluated, except those at ``keep_steps`` and a final
    export without a step."""
    for step, path in find_checkpoints(run_dir):
        if step is not None and step not in keep_steps:
            shutil.rmtree(path.parent if path.name == "model" else path, ignore_errors=True)
