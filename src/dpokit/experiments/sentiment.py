"""The paper's controlled-sentiment experiment (section 6.1, Figure 2 left), in miniature.

Pipeline (``dpokit experiment sentiment --mode full|quick``):

1. **SFT model** -- a ~2M-parameter GPT-2 and BPE tokenizer trained from scratch on a generated
   review corpus (:mod:`dpokit.experiments.lm`, :mod:`dpokit.experiments.corpus`); cached.
2. **Ground-truth reward** -- VADER's compound sentiment of prompt + completion
   (:mod:`dpokit.experiments.reward`).
3. **Preferences** -- prompts are 2-8-token prefixes of held-out reviews; completions sampled from
   the SFT model are paired and labelled by the reward (:mod:`dpokit.experiments.preferences`).
4. **Methods** -- DPO over a sweep of beta, Preferred-FT (SFT on the chosen completions) and
   Unlikelihood, all through :func:`dpokit.training.run`; Best-of-N from the SFT model; and RL on the
   ground-truth reward with TRL's RLOOTrainer (:mod:`dpokit.experiments.baselines`).
5. **Evaluation** -- for every saved checkpoint, mean reward and sequence KL(pi || pi_sft) from
   samples on held-out prompts (:func:`dpokit.analysis.frontier.estimate_reward_kl`), drawn as the
   reward-KL frontier (``frontier.png``) with ``results.json`` and ``results.md``.

Each finished run's points are stored under ``<out>/points/`` keyed by the settings
(:class:`dpokit.experiments.results.ResultStore`), so an interrupted experiment picks up where it
stopped. The experiment returns a :class:`SentimentResult`; the commands print it.

With ``--engine vllm`` a running vLLM server that serves the SFT model draws every sample the evaluation
takes -- each checkpoint's frontier samples, Best-of-N's pool, the win rates' samples -- each model loaded
into it in turn (:class:`dpokit.analysis.frontier.CheckpointServer`), the SFT model's weights given back at
the end; the KL's log-probs are computed here. The labelled pairs stay SFT samples from dpokit's seeded
generator, so both engines train on the same data. Points are stored under another key per engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from dpokit.analysis.frontier import CheckpointServer, FrontierPoint, dominance_summary, restoring, write_results
from dpokit.errors import ConfigError
from dpokit.experiments.lm import LMSettings, load_or_pretrain
from dpokit.experiments.preferences import make_preference_pairs, make_prompts, write_jsonl
from dpokit.experiments.results import FrontierEvaluation, ResultStore, Sample, StoredRun, remove_checkpoints
from dpokit.experiments.reward import vader_reward
from dpokit.generation import EngineOptions, SamplingEngine

if TYPE_CHECKING:
    from dpokit.config import TrainConfig
    from dpokit.experiments.winrates import WinrateStage

Log = Callable[[str], None]
SftModel = tuple[torch.nn.Module, Any, Path]  # an SFT model, its tokenizer and the directory it is saved in


def store_key(key: str, engine: EngineOptions, sft: SftModel | None) -> str:
    """``key`` (the settings') with what else an experiment's stored results depend on: a sampling engine other
    than dpokit's (its samples are not dpokit's) and an SFT model given instead of the cached one."""
    if engine.engine != "dpokit":
        key += f"+{engine.engine}"
    if sft is not None:
        key += "+" + hashlib.sha256(str(Path(sft[2]).resolve()).encode()).hexdigest()[:8]
    return key


ALL_METHODS = ("dpo", "preferred-ft", "unlikelihood", "orpo", "simpo", "kto", "best-of-n", "rl")
METHOD_LABELS = {
    "dpo": "DPO",
    "preferred-ft": "Preferred-FT",
    "unlikelihood": "Unlikelihood",
    "orpo": "ORPO (no reference)",
    "simpo": "SimPO (no reference)",
    "kto": "KTO (unpaired, half the pairs)",
    "best-of-n": "Best-of-N",
    "rl": "RLOO (TRL, true reward)",
    "reference": "SFT (reference)",
}
_Settings = TypeVar("_Settings")

DEFAULT_CACHE_DIR = ".dpokit_cache/sentiment"  # where the SFT model is cached between runs
DEMO_RUN_DIR = "runs/demo"  # where `dpokit demo` writes its data and DPO run
KEEP_SAMPLES = 6  # samples kept per evaluated model (the last checkpoint of each run) for results.json
TRAIN_PROMPT_SEED = 1001  # held-out reviews for training prompts: a corpus seed the SFT model never saw
EVAL_PROMPT_SEED = 2002  # and another for evaluation prompts


@dataclass(frozen=True)
class ExperimentSettings:
    """Every knob of one experiment; :data:`MODES` holds the named presets."""

    lm: LMSettings = field(default_factory=LMSettings)
    methods: tuple[str, ...] = ALL_METHODS
    # Preferences.
    num_train_prompts: int = 800
    completions_per_prompt: int = 4
    label_temperature: float = 0.0
    require_eos: bool = True  # drop completions cut at max_new_tokens from the pairs (off only for smoke tests)
    # Evaluation.
    num_eval_prompts: int = 256
    eval_samples_per_prompt: int = 2
    max_new_tokens: int = 48
    # dpokit trainer runs (DPO, Preferred-FT, Unlikelihood).
    dpo_betas: tuple[float, ...] = (0.05, 0.1, 0.5, 1.0)
    unlikelihood_alpha: float = 1.0
    epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-5
    warmup_steps: int = 10
    checkpoints_per_run: int = 6
    # Reference-free and unpaired objectives (dpokit trainer runs on the same pairs; KTO on one
    # completion of each pair, labelled desirable when its reward is above the SFT samples' median).
    orpo_beta: float = 0.1  # ORPO's lambda, the weight of the odds-ratio term beside the NLL
    simpo_beta: float = 2.0  # SimPO's beta on per-token average log-probs
    simpo_gamma: float = 0.5
    kto_beta: float = 0.1
    # Best-of-N.
    best_of_n: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    # RL baseline (TRL RLOOTrainer; its beta weighs the KL penalty in the reward).
    rl_betas: tuple[float, ...] = (0.05, 0.2)
    rl_steps: int = 64
    rl_prompts_per_step: int = 16
    rl_generations: int = 4
    rl_lr: float = 1e-4
    seed: int = 0
    # Win rates against the SFT model's samples (Figure 2 right), judged by the ground-truth reward;
    # empty temperatures skip the stage. The stage reads each run's final model, so it does not shape the points.
    winrate_temperatures: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    winrate_prompts: int = 256
    winrate_best_of_n: int = 16
    judge_check_prompts: int = 128  # held-out pairs on which the DPO policies' implicit reward is checked

    def key(self) -> str:
        """Hash of every setting that shapes a run's result. ``methods`` only picks which runs happen,
        and the win-rate settings only what is measured afterwards, so they are left out: points stored
        by a ``--methods dpo`` run are reused by a full one."""
        settings = {**asdict(self), "methods": list(ALL_METHODS)}
        for name in ("winrate_temperatures", "winrate_prompts", "winrate_best_of_n", "judge_check_prompts"):
            settings.pop(name)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


# The models here are tiny (0.7-2M parameters): one intra-op thread beats two, and by far on a busy
# machine (a pretraining step measured 0.22 s on 1 thread against 2.3 s on 2 threads while the other
# core was loaded), so the experiment and the demo run torch on one thread unless told otherwise.
DEFAULT_THREADS = 1


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the enclosed code with ``num_threads`` torch intra-op threads, then restore the setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


MODES: dict[str, ExperimentSettings] = {
    # The reproduction: every method and the win rates (timings measured in docs/experiments.md).
    "full": ExperimentSettings(lm=LMSettings(steps=400)),
    # The paper's methods, smaller everything.
    "quick": ExperimentSettings(
        lm=LMSettings(num_texts=3000, n_embd=128, n_layer=3, steps=150, batch_size=48),
        num_train_prompts=300,
        num_eval_prompts=128,
        dpo_betas=(0.1, 0.5),
        epochs=2,
        lr=1e-4,
        checkpoints_per_run=2,
        best_of_n=(1, 4, 16),
        rl_betas=(0.05,),
        rl_steps=16,
        rl_prompts_per_step=8,
        # ORPO, SimPO, KTO and the win-rate stage are left out to keep the quick mode quick.
        methods=("dpo", "preferred-ft", "unlikelihood", "best-of-n", "rl"),
        winrate_temperatures=(),
    ),
    # `dpokit demo`: DPO only, one beta.
    "demo": ExperimentSettings(
        lm=LMSettings(num_texts=3000, n_embd=128, n_layer=3, steps=150, batch_size=48),
        methods=("dpo",),
        lr=2e-4,
        num_train_prompts=200,
        num_eval_prompts=96,
        dpo_betas=(0.1,),
        epochs=2,
        checkpoints_per_run=1,
    ),
    # Tests: seconds.
    "smoke": ExperimentSettings(
        lm=LMSettings(num_texts=300, vocab_size=384, n_embd=32, n_layer=1, n_head=2, steps=20, batch_size=16, lr=1e-2),
        require_eos=False,
        num_train_prompts=12,
        completions_per_prompt=3,
        num_eval_prompts=6,
        eval_samples_per_prompt=1,
        max_new_tokens=12,
        dpo_betas=(0.1,),
        epochs=2,
        batch_size=8,
        checkpoints_per_run=2,
        best_of_n=(1, 2),
        rl_betas=(0.1,),
        rl_steps=2,
        rl_prompts_per_step=2,
        rl_generations=2,
        winrate_temperatures=(0.5, 1.0),
        winrate_prompts=6,
        winrate_best_of_n=2,
        judge_check_prompts=6,
    ),
}


def trainer_config(
    settings: ExperimentSettings,
    *,
    sft_dir: Path,
    train_path: Path,
    run_dir: Path,
    terms: list[dict[str, Any]],
    beta: float,
    num_pairs: int,
    cache_dir: Path,
) -> TrainConfig:
    """The :class:`dpokit.config.TrainConfig` of one preference run of the experiment: ``terms`` (with
    ``beta``) on ``train_path`` from the SFT model, for ``settings.epochs`` epochs of ``num_pairs`` rows,
    with ``settings.checkpoints_per_run`` checkpoints."""
    from dpokit.config import config_from_dict

    steps = settings.epochs * -(-num_pairs // settings.batch_size)
    needs_reference = any(t["name"] not in ("sft", "unlikelihood", "orpo", "simpo") for t in terms)
    return config_from_dict(
        {
            "model": {"name_or_path": str(sft_dir), "dtype": "float32"},
            # 5% of the pairs are held out: the run logs held-out reward accuracy and margins as it trains.
            "data": {
                "train_path": str(train_path),
                "max_length": 96,
                "max_prompt_length": 16,
                "eval_split_fraction": 0.05,
                "cache_dir": str(cache_dir / "data"),
            },
            "loss": {"beta": beta, "terms": terms},
            "reference": {"strategy": "auto" if needs_reference else "none"},
            "optim": {
                "optimizer": "adamw",
                "lr": settings.lr,
                "warmup_steps": settings.warmup_steps,
                "schedule": "constant",
                "epochs": settings.epochs,
                "batch_size": settings.batch_size,
                "grad_accumulation": 1,
                "seed": settings.seed,
                "weight_decay": 0.0,
            },
            "eval": {"every_steps": max(1, steps // 5), "batch_size": 64},
            "logging": {"run_dir": str(run_dir), "log_every": 10, "tensorboard": True, "progress_bar": False, "plot": True},
            "checkpoint": {"every_steps": max(1, steps // settings.checkpoints_per_run), "keep_last": 1000},
        }
    )


@dataclass(frozen=True)
class SentimentResult:
    """What one experiment measured: the frontier's points and what ``results.json`` holds beside them."""

    points: list[FrontierPoint]
    settings: ExperimentSettings
    sft_dir: Path
    preferences: dict[str, float]
    dpo_dominance: dict[str, dict[str, Any]] | None
    timings_seconds: dict[str, float]
    samples: dict[str, list[Sample]]  # the first samples of each evaluated model (the last checkpoint of each run)
    torch_threads: int
    winrate: WinrateStage | None
    date: str

    def summary(self) -> dict[str, Any]:
        """``results.json``'s fields beside the points."""
        return {
            "date": self.date,
            "settings": asdict(self.settings),
            "sft_dir": str(self.sft_dir),
            "preferences": self.preferences,
            "dpo_dominance": self.dpo_dominance,
            "timings_seconds": self.timings_seconds,
            "samples": self.samples,
            "torch_threads": self.torch_threads,
            "winrate": None if self.winrate is None else asdict(self.winrate),
        }


class Experiment:
    """One experiment in ``out_dir``: the shared pieces (SFT model, prompts, data) and the method runs.
    Progress goes to ``log``, one line at a time. ``engine``: who draws the evaluation samples, Best-of-N's
    pool and the win rates' samples (a vLLM server serving the SFT model, each model loaded into it in turn);
    ``sft``: an SFT model to start from instead of the cached pretrained one (its settings' ``lm`` then unused)."""

    def __init__(
        self,
        settings: ExperimentSettings,
        out_dir: str | Path,
        cache_dir: str | Path,
        *,
        keep_checkpoints: bool = False,
        log: Log | None = None,
        engine: EngineOptions | None = None,
        sft: SftModel | None = None,
    ) -> None:
        unknown = set(settings.methods) - set(ALL_METHODS)
        if unknown:
            raise ConfigError(f"unknown methods {sorted(unknown)}; choose from {list(ALL_METHODS)}")
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.cache_dir = Path(cache_dir)
        self.keep_checkpoints = keep_checkpoints
        self.log: Log = log or (lambda line: None)
        self.engine = engine or EngineOptions()
        self.engine.validate()
        self.store = ResultStore(self.out_dir / "points", store_key(settings.key(), self.engine, sft), self.log)
        self.server: CheckpointServer | None = None
        self.timings: dict[str, float] = {}
        self.samples: dict[str, list[Sample]] = {}
        self.reward_fn = vader_reward
        self.sft = sft

    # -- shared pieces ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """The SFT model (cached, or the one given), the training and evaluation prompts, and the labelled pairs."""
        s = self.settings
        start = time.time()
        sft: SftModel = self.sft or load_or_pretrain(s.lm, self.cache_dir, log=self.log)
        self.sft_model, self.tokenizer, self.sft_dir = sft
        self.timings["sft_model"] = time.time() - start
        start = time.time()
        self.train_prompts = make_prompts(self.tokenizer, s.num_train_prompts, TRAIN_PROMPT_SEED + s.seed)
        self.eval_prompts = make_prompts(self.tokenizer, s.num_eval_prompts, EVAL_PROMPT_SEED + s.seed)
        (self.out_dir / "data").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "data" / "eval_prompts.txt").write_text("\n".join(self.eval_prompts) + "\n")
        if self.engine.engine == "vllm":
            self.server = CheckpointServer(str(self.sft_dir), self.engine)
            self.server.restore(force=True)  # a run stopped mid-evaluation may have left a checkpoint's weights in it
            self.log(
                f"evaluation samples, Best-of-N and win rates from the vLLM server at {self.server.engine.url} "
                f"({self.sft_dir}); the labelled pairs are SFT samples from dpokit's seeded generator on either engine"
            )
        self.frontier = FrontierEvaluation(
            self.sft_model,
            self.tokenizer,
            self.eval_prompts,
            self.reward_fn,
            samples_per_prompt=s.eval_samples_per_prompt,
            max_new_tokens=s.max_new_tokens,
            seed=s.seed + 7,
            server=self.server,
        )
        rows, self.preference_stats = make_preference_pairs(
            self.sft_model,
            self.tokenizer,
            self.train_prompts,
            self.reward_fn,
            completions_per_prompt=s.completions_per_prompt,
            max_new_tokens=s.max_new_tokens,
            label_temperature=s.label_temperature,
            require_eos=s.require_eos,
            seed=s.seed,
        )
        if not rows:
            raise ConfigError("no preference pairs were produced; raise num_train_prompts or completions_per_prompt")
        self.train_path = write_jsonl(rows, self.out_dir / "data" / "preferences.jsonl")
        self.timings["preferences"] = time.time() - start
        self.log(
            f"preferences: {self.preference_stats['pairs']} pairs from {len(self.train_prompts)} prompts "
            f"(SFT mean reward {self.preference_stats['sft_reward_mean']:.3f}) in {self.timings['preferences']:.0f}s"
        )

    def reference_point(self) -> FrontierPoint:
        """The SFT model on the frontier (KL 0), its first samples kept as ``samples["reference"]``."""
        point, self.samples["reference"] = self.frontier.estimate(
            self.sft_model, method=METHOD_LABELS["reference"], run="sft", step=0, keep_samples=KEEP_SAMPLES
        )
        self.log(f"SFT reference: reward {point.reward_mean:.3f}  KL 0")
        return point

    # -- runs ------------------------------------------------------------------------------------

    def _stored(self, run: str) -> list[FrontierPoint] | None:
        """The stored points of ``run`` under these settings (its samples and time restored), or None."""
        stored = self.store.load(run)
        if stored is None:
            return None
        self.samples[run] = stored.samples
        self.timings[run] = stored.seconds
        self.log(f"{run}: cached")
        return stored.points

    def _keep(self, run: str, points: list[FrontierPoint], samples: list[Sample], start: float) -> list[FrontierPoint]:
        """Record ``run``'s results (samples, time since ``start``) and store them."""
        self.samples[run] = samples
        self.timings[run] = time.time() - start
        self.store.save(run, StoredRun(points=points, seconds=self.timings[run], samples=samples))
        return points

    def _evaluate_run_dir(
        self, run: str, method: str, run_dir: Path, beta: float | None
    ) -> tuple[list[FrontierPoint], list[Sample]]:
        """Every checkpoint of ``run_dir`` on the frontier; the checkpoints are removed afterwards unless kept."""
        evaluated = self.frontier.checkpoints(
            run_dir, method=METHOD_LABELS[method], run=run, beta=beta, keep_samples=KEEP_SAMPLES, log=self.log
        )
        if not self.keep_checkpoints:
            remove_checkpoints(run_dir)
        return evaluated

    def run_trainer(
        self, run: str, method: str, terms: list[dict[str, Any]], beta: float | None, train_path: Path | None = None
    ) -> list[FrontierPoint]:
        """One dpokit trainer run (on ``train_path``, default the preference pairs); its checkpoints
        evaluated on the frontier."""
        stored = self._stored(run)
        if stored is not None:
            return stored
        from dpokit.training.trainer import run as train_run

        start = time.time()
        run_dir = self.out_dir / "runs" / run
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = trainer_config(
            self.settings,
            sft_dir=self.sft_dir,
            train_path=train_path or self.train_path,
            run_dir=run_dir,
            terms=terms,
            beta=beta if beta is not None else 0.1,
            num_pairs=int(self.preference_stats["pairs"]),
            cache_dir=self.cache_dir,
        )
        self.log(f"{run}: training ({cfg.optim.epochs} epochs, checkpoint every {cfg.checkpoint.every_steps} steps)")
        result = train_run(cfg)
        train_seconds = time.time() - start
        points, samples = self._evaluate_run_dir(run, method, run_dir, beta)
        self.log(
            f"{run}: {result.global_step} steps in {train_seconds:.0f}s, evaluated in {time.time() - start - train_seconds:.0f}s"
        )
        return self._keep(run, points, samples, start)

    def run_best_of_n(self) -> list[FrontierPoint]:
        """Best-of-n of the SFT model's samples for every n in ``best_of_n`` (KL analytic)."""
        from dpokit.experiments.baselines import best_of_n_points

        stored = self.store.load("best-of-n")
        if stored is not None:
            self.timings["best-of-n"] = stored.seconds
            return stored.points
        start = time.time()
        s = self.settings
        points = best_of_n_points(
            self.sft_model,
            self.tokenizer,
            self.eval_prompts,
            self.reward_fn,
            s.best_of_n,
            max_new_tokens=s.max_new_tokens,
            seed=s.seed + 11,
            engine=self._reference_engine(),
        )
        for point in points:
            self.log(f"  best-of-{point.n}: reward {point.reward_mean:.3f}  KL {point.kl_mean:.2f} (analytic)")
        self.timings["best-of-n"] = time.time() - start
        self.store.save("best-of-n", StoredRun(points=points, seconds=self.timings["best-of-n"]))
        return points

    def _reference_engine(self) -> SamplingEngine | None:
        """The vLLM server with the SFT model's weights (given back first), or None (dpokit's engine)."""
        if self.server is None:
            return None
        self.server.restore()
        return self.server.engine

    def run_rl(self, beta: float) -> list[FrontierPoint]:
        """RLOO (TRL) on the ground-truth reward with KL weight ``beta``; its checkpoints on the frontier."""
        from dpokit.experiments.baselines import train_rloo

        run = f"rloo-beta{beta:g}"
        stored = self._stored(run)
        if stored is not None:
            return stored
        s = self.settings
        start = time.time()
        run_dir = self.out_dir / "runs" / run
        shutil.rmtree(run_dir, ignore_errors=True)
        self.log(f"{run}: TRL RLOOTrainer, {s.rl_steps} steps of {s.rl_prompts_per_step} prompts x {s.rl_generations}")
        train_rloo(
            self.sft_dir,
            self.train_prompts,
            run_dir,
            self.reward_fn,
            beta=beta,
            steps=s.rl_steps,
            save_every=max(1, s.rl_steps // s.checkpoints_per_run),
            prompts_per_step=s.rl_prompts_per_step,
            num_generations=s.rl_generations,
            max_new_tokens=s.max_new_tokens,
            lr=s.rl_lr,
            seed=s.seed,
        )
        points, samples = self._evaluate_run_dir(run, "rl", run_dir, beta)
        return self._keep(run, points, samples, start)

    def unpaired_data(self) -> Path:
        """KTO's data with half the pairs' information thrown away: one completion of each pair (the
        chosen one of even-numbered pairs, the rejected one of odd-numbered ones), labelled desirable
        when its ground-truth reward is above the median reward of the pairs' completions."""
        rows = [json.loads(line) for line in self.train_path.read_text().splitlines() if line.strip()]
        rewards = sorted(r[k] for r in rows for k in ("chosen_reward", "rejected_reward"))
        threshold = rewards[len(rewards) // 2]
        unpaired = []
        for index, row in enumerate(rows):
            side = "chosen" if index % 2 == 0 else "rejected"
            reward = row[f"{side}_reward"]
            unpaired.append({"prompt": row["prompt"], "completion": row[side], "label": reward > threshold, "reward": reward})
        self.preference_stats["kto_threshold"] = threshold
        self.preference_stats["kto_desirable"] = sum(r["label"] for r in unpaired)
        self.preference_stats["kto_examples"] = len(unpaired)
        return write_jsonl(unpaired, self.out_dir / "data" / "unpaired.jsonl")

    def run_objectives(self) -> list[FrontierPoint]:
        """ORPO, SimPO (reference-free, on the pairs) and KTO (unpaired), those of them in ``methods``."""
        s = self.settings
        points: list[FrontierPoint] = []
        if "orpo" in s.methods:
            points += self.run_trainer("orpo", "orpo", [{"name": "orpo", "nll_weight": 1.0}], s.orpo_beta)
        if "simpo" in s.methods:
            points += self.run_trainer("simpo", "simpo", [{"name": "simpo", "gamma": s.simpo_gamma}], s.simpo_beta)
        if "kto" in s.methods:
            points += self.run_trainer("kto", "kto", [{"name": "kto"}], s.kto_beta, train_path=self.unpaired_data())
        return points

    # -- win rates against the SFT model (Figure 2 right) ----------------------------------------

    def winrate_models(self) -> list[tuple[str, str]]:
        """``(name, final model directory)`` of every finished dpokit trainer run in ``methods``."""
        s = self.settings
        runs = [(f"DPO β={b:g}", f"dpo-beta{b:g}") for b in s.dpo_betas] if "dpo" in s.methods else []
        runs += [(METHOD_LABELS[m], m) for m in ("preferred-ft", "unlikelihood") if m in s.methods]
        runs += [(METHOD_LABELS[m], m) for m in ("orpo", "simpo", "kto") if m in s.methods]
        found = [(name, self.out_dir / "runs" / run / "final") for name, run in runs]
        return [(name, str(path)) for name, path in found if (path / "config.json").exists()]

    def run_winrates(self) -> WinrateStage | None:
        """The win-rate stage (:mod:`dpokit.experiments.winrates`) on every finished trainer run in
        ``methods`` and Best-of-N; None when it has no temperatures or no model."""
        from dpokit.experiments.winrates import WinrateSetup, run_winrate_stage

        s = self.settings
        models = self.winrate_models()
        if not s.winrate_temperatures or not models:
            return None
        start = time.time()
        setup = WinrateSetup(
            out=self.out_dir / "winrate",
            sft_dir=self.sft_dir,
            sft_model=self.sft_model,
            tokenizer=self.tokenizer,
            eval_prompts=self.eval_prompts,
            reward_fn=self.reward_fn,
            temperatures=s.winrate_temperatures,
            num_prompts=s.winrate_prompts,
            best_of_n=s.winrate_best_of_n if "best-of-n" in s.methods else None,
            judge_check_prompts=s.judge_check_prompts,
            max_new_tokens=s.max_new_tokens,
            require_eos=s.require_eos,
            seed=s.seed,
            engine=self.engine,
            server=self.server,
        )
        stage = run_winrate_stage(setup, models, log=self.log)
        self.timings["winrate"] = time.time() - start
        self.log(f"win rates: {len(stage.results)} rows in {self.timings['winrate']:.0f}s -> {setup.out}")
        return stage

    # -- the whole thing -------------------------------------------------------------------------

    def run_methods(self) -> list[FrontierPoint]:
        """Every method in ``methods``, in the order of :data:`ALL_METHODS`: their points."""
        s = self.settings
        points: list[FrontierPoint] = []
        if "dpo" in s.methods:
            for beta in s.dpo_betas:
                points += self.run_trainer(f"dpo-beta{beta:g}", "dpo", [{"name": "sigmoid"}], beta)
        if "preferred-ft" in s.methods:
            points += self.run_trainer("preferred-ft", "preferred-ft", [{"name": "sft"}], None)
        if "unlikelihood" in s.methods:
            points += self.run_trainer(
                "unlikelihood", "unlikelihood", [{"name": "unlikelihood", "alpha": s.unlikelihood_alpha}], None
            )
        points += self.run_objectives()
        if "best-of-n" in s.methods:
            points += self.run_best_of_n()
        if "rl" in s.methods:
            for beta in s.rl_betas:
                points += self.run_rl(beta)
        return points

    def run(self) -> SentimentResult:
        """Prepare, run every method, the win-rate stage; write ``frontier.png``, ``results.json`` and
        ``results.md`` into ``out_dir``."""
        s = self.settings
        start = time.time()
        self.prepare()
        with restoring(self.server):
            points = [self.reference_point(), *self.run_methods()]
        winrates = self.run_winrates()
        self.timings["total"] = time.time() - start
        result = SentimentResult(
            points=points,
            settings=s,
            sft_dir=self.sft_dir,
            preferences=self.preference_stats,
            dpo_dominance=dominance_summary(points, METHOD_LABELS["dpo"]) if "dpo" in s.methods else None,
            timings_seconds={k: round(v, 1) for k, v in self.timings.items()},
            samples=self.samples,
            torch_threads=torch.get_num_threads(),
            winrate=winrates,
            date=time.strftime("%Y-%m-%d"),
        )
        write_results(points, self.out_dir, title="Controlled sentiment (miniature): reward vs KL", extra=result.summary())
        self.log(f"done in {self.timings['total'] / 60:.1f} min: {self.out_dir / 'frontier.png'}")
        return result


def run_experiment(
    mode: str | ExperimentSettings = "full",
    out_dir: str | Path = "runs/sentiment",
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    *,
    threads: int = DEFAULT_THREADS,
    keep_checkpoints: bool = False,
    log: Log | None = None,
    engine: EngineOptions | None = None,
) -> SentimentResult:
    """Run the experiment with a named mode (``full``, ``quick``, ``demo``, ``smoke``) or explicit
    settings, on ``threads`` torch threads, the evaluation samples, Best-of-N's and the win rates' drawn by
    ``engine`` (default dpokit's; see :class:`Experiment` for the rest)."""
    with torch_threads(threads):
        settings = resolve_mode(mode, MODES)
        experiment = Experiment(settings, out_dir, cache_dir, keep_checkpoints=keep_checkpoints, log=log, engine=engine)
        return experiment.run()


def resolve_mode(mode: str | _Settings, modes: dict[str, _Settings]) -> _Settings:
    """An experiment's settings: ``modes[mode]`` for a named mode (a ConfigError naming the choices for
    an unknown one), or ``mode`` itself when it already is settings."""
    if not isinstance(mode, str):
        return mode
    if mode not in modes:
        raise ConfigError(f"unknown mode {mode!r}; choose from {sorted(modes)}")
    return modes[mode]


# ------------------------------------------------------------------------------------------------
# dpokit demo: the quick sentiment task, DPO only, before/after
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoResult:
    """What ``dpokit demo`` measured: the SFT model and the DPO policy on the frontier, each with its first
    samples (sample i of both answers the same prompt), the DPO run's held-out evaluations, and where it went."""

    beta: float
    before: FrontierPoint
    before_samples: list[Sample]
    after: FrontierPoint
    after_samples: list[Sample]  # empty when the DPO run left no checkpoint to evaluate
    evals: list[dict[str, Any]]  # the run's held-out evaluation records (metrics.jsonl, split "eval")
    num_eval_prompts: int
    eval_samples_per_prompt: int
    seconds: float
    run_dir: Path
    out_dir: Path


def run_sentiment_demo(
    out_dir: str | Path = DEMO_RUN_DIR,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    *,
    settings: ExperimentSettings | None = None,
    log: Log | None = None,
    threads: int = DEFAULT_THREADS,
) -> DemoResult:
    """``dpokit demo``: teach the tiny review model to write positive continuations with DPO.

    Pretrains (or loads from the cache) the small GPT-2, labels pairs of its own completions with
    VADER, runs DPO through :func:`dpokit.training.run` (progress to ``log``), and measures the
    ground-truth reward and KL(pi || pi_sft) before and after, with samples of both models for the same
    prompts. Only the SFT model is cached: the demo always trains.
    """
    with torch_threads(threads):
        return _sentiment_demo(out_dir, cache_dir, settings or MODES["demo"], log)


def online_example_command(out_dir: str | Path) -> str:
    """The command that runs ``examples/online.yaml`` on what ``dpokit demo`` left in ``out_dir``: the
    example's own paths for the default run directory, overrides of them for another."""
    command = "dpokit online examples/online.yaml"
    out = Path(out_dir)
    if out == Path(DEMO_RUN_DIR):
        return command
    return (
        f"{command} model.name_or_path={out / 'sft'} data.eval_path={out / 'data' / 'preferences.jsonl'} "
        f"online.prompts_path={out / 'data' / 'eval_prompts.txt'} logging.run_dir={out / 'online'}"
    )


def _sentiment_demo(out_dir: str | Path, cache_dir: str | Path, settings: ExperimentSettings, log: Log | None) -> DemoResult:
    from dpokit.training.tracking import read_metrics

    settings = dataclasses.replace(settings, methods=("dpo",), dpo_betas=settings.dpo_betas[:1])
    start = time.time()
    experiment = Experiment(settings, out_dir, cache_dir, log=log)
    shutil.rmtree(Path(out_dir) / "points", ignore_errors=True)  # the demo always trains; only the SFT model is cached
    experiment.prepare()
    # The SFT model beside the demo's data, at a path the online example names (examples/online.yaml).
    shutil.copytree(experiment.sft_dir, Path(out_dir) / "sft", dirs_exist_ok=True)
    before, before_samples = experiment.frontier.estimate(
        experiment.sft_model, method=METHOD_LABELS["reference"], run="sft", step=0, keep_samples=KEEP_SAMPLES
    )
    beta = settings.dpo_betas[0]
    run = f"dpo-beta{beta:g}"
    points = experiment.run_trainer(run, "dpo", [{"name": "sigmoid"}], beta)
    run_dir = Path(out_dir) / "runs" / run
    return DemoResult(
        beta=beta,
        before=before,
        before_samples=before_samples,
        after=points[-1],
        after_samples=experiment.samples.get(run, []),
        evals=[r for r in read_metrics(run_dir) if r.get("split") == "eval"],
        num_eval_prompts=len(experiment.eval_prompts),
        eval_samples_per_prompt=settings.eval_samples_per_prompt,
        seconds=time.time() - start,
        run_dir=run_dir,
        out_dir=Path(out_dir),
    )
