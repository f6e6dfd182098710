"""``dpokit experiment shapes``: proof of learning on a vision-language model, in miniature.

The task (:mod:`dpokit.experiments.shapes`): an image of one coloured shape, "What colour is the shape?";
the ground-truth reward (:func:`~dpokit.experiments.shapes.colour_reward`) is 1 when the answer names the
shape's colour, read from the pixels, and 0 otherwise. Everything is built on the spot:

1. **Model** -- a tiny LLaVA (CLIP-style vision tower, MLP projector, Llama), randomly initialised, with a
   tokenizer trained on the task's words (:func:`~dpokit.experiments.shapes.build_tiny_vlm`).
2. **SFT** -- full fine-tuning (vision tower frozen, as ``model.vision`` defaults) on demonstrations of
   which a fraction ``sft_noise`` name a colour drawn at random instead of the shape's: the SFT model
   answers in the task's form ("It is red.") but, sampled, is right only about as often as its
   demonstrations were. This is how it is set up, not an accident of too few steps.
3. **Preferences** -- other images; chosen names the shape's colour, rejected another colour.
4. **Arms** -- from the SFT model, through :func:`dpokit.training.run` on those pairs: DPO for each beta
   in ``betas``, DPO plus the NLL of the chosen answer (``sigmoid`` + ``sft`` terms, RPO's objective), and
   Preferred-FT (the NLL of the chosen answers alone: what the clean answers teach without the rejected
   ones); every ``checkpoint_every`` steps a checkpoint.
5. **Evaluation** -- on held-out images, for the SFT model and every checkpoint: greedy accuracy (with a
   Wilson 95% interval) and, from ``samples_per_prompt`` samples per image at temperature 1 (full softmax),
   the sampled accuracy (the reward) and KL(pi || pi_sft) in nats per answer, with 95% normal intervals
   -- the reward-KL frontier's points. Where the answers' probability goes says why an arm moves: each
   model's answer slot (:meth:`ShapesExperiment.answer_slot`: after "It is", the probability of naming any
   colour, and of the right one among the colours) and each run's training log (``logps/chosen``,
   ``logps/rejected``) are kept beside the points.

Outputs in ``out``: ``results.json``, ``results.md`` (the table), ``frontier.png``; each finished run's
points are stored under ``out/points`` keyed by the settings, so an interrupted experiment continues. The
runs' checkpoints are kept (under 1 MB each, optimizer state included), so any of them can be sampled or judged
again (``dpokit winrate`` with :func:`~dpokit.experiments.shapes.colour_reward`, docs/vlm.md).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dpokit.analysis.frontier import FrontierPoint
from dpokit.errors import ConfigError
from dpokit.experiments.results import ResultStore, StoredRun
from dpokit.experiments.shapes import COLOURS, build_tiny_vlm, colour_reward, shape_colour, shapes_rows

Log = Callable[[str], None]
ARMS = ("dpo", "dpo+nll", "preferred-ft", "online")
ARM_LABELS = {
    "dpo": "DPO",
    "dpo+nll": "DPO + NLL(chosen)",
    "preferred-ft": "Preferred-FT",
    "online": "Online DPO (ground-truth judge)",
    "sft": "SFT (reference)",
}
ONLINE_JUDGE = "reward:dpokit.experiments.shapes:colour_reward"
Z95 = 1.959964


@dataclass(frozen=True)
class ShapesSettings:
    """Every knob of the experiment; :data:`MODES` holds the named presets."""

    hidden_size: int = 32
    layers: int = 2
    image_size: int = 32
    patch_size: int = 8  # 16 image tokens per prompt
    sft_rows: int = 512
    sft_noise: float = 0.6  # the fraction of SFT answers that name a random colour (possibly the right one)
    sft_steps: int = 200
    sft_lr: float = 3e-3
    pairs: int = 2048
    eval_images: int = 400
    samples_per_prompt: int = 4
    arms: tuple[str, ...] = ARMS
    betas: tuple[float, ...] = (0.1, 0.5)  # DPO's; DPO + NLL runs with the first
    steps: int = 60
    lr: float = 1e-4
    batch_size: int = 16
    grad_accumulation: int = 8  # 128 rows per optimizer step
    checkpoint_every: int = 10
    max_new_tokens: int = 8
    online_samples: int = 4  # the online arm: completions per prompt, batch_size x grad_accumulation prompts per round
    seed: int = 0

    def key(self) -> str:
        """Hash of every setting (``arms`` only picks which runs happen, so it is left out)."""
        import hashlib

        settings = {**asdict(self), "arms": list(ARMS)}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


MODES: dict[str, ShapesSettings] = {
    "full": ShapesSettings(),
    "quick": ShapesSettings(
        sft_rows=48,
        sft_steps=12,
        pairs=24,
        eval_images=8,
        samples_per_prompt=2,
        betas=(0.1,),
        steps=4,
        batch_size=8,
        grad_accumulation=1,
        checkpoint_every=2,
        arms=("dpo", "preferred-ft", "online"),
    ),
}


@dataclass(frozen=True)
class ShapesResult:
    """What the experiment measured: a point per evaluated model (the sampled accuracy as the reward, its KL
    to the SFT model), each point's greedy accuracy, and each run's training log at its first and last record."""

    points: list[FrontierPoint]
    greedy: dict[str, dict[str, float]]  # "run@step" -> accuracy, ci_low, ci_high, n, and the answer slot's measures
    training: dict[str, dict[str, float]]  # run -> logps/chosen and logps/rejected at the first and last record
    settings: ShapesSettings
    timings_seconds: dict[str, float]
    date: str

    def summary(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "settings": asdict(self.settings),
            "greedy": self.greedy,
            "training": self.training,
            "timings_seconds": self.timings_seconds,
        }


def wilson(successes: float, n: int) -> tuple[float, float]:
    from dpokit.judges.stats import wilson_interval

    return wilson_interval(successes, n)


def noisy_sft_rows(rows: list[dict[str, Any]], noise: float, seed: int) -> list[dict[str, Any]]:
    """The rows as demonstrations: with probability ``noise`` the answer names a colour drawn at random
    (any of them); ``rejected`` is another colour (only the chosen answer is trained on)."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        colour = rng.choice(list(COLOURS)) if rng.random() < noise else row["colour"]
        other = rng.choice([c for c in COLOURS if c != colour])
        answer, wrong = f"It is {colour}.", f"It is {other}."
        out.append(
            {**row, "chosen": [{"role": "assistant", "content": answer}], "rejected": [{"role": "assistant", "content": wrong}]}
        )
    return out


def _write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def trainer_config(
    s: ShapesSettings,
    *,
    model: Path,
    data: Path,
    run_dir: Path,
    terms: list[dict[str, Any]],
    beta: float,
    steps: int,
    lr: float,
    checkpoint_every: int,
) -> Any:
    """The :class:`dpokit.config.TrainConfig` of one run of the experiment (full fine-tuning, float32)."""
    from dpokit.config import config_from_dict

    needs_reference = any(term["name"] != "sft" for term in terms)
    return config_from_dict(
        {
            "model": {"name_or_path": str(model), "dtype": "float32"},
            "data": {
                "train_path": str(data),
                "max_length": 64,
                "max_prompt_length": 48,
                "cache_dir": str(run_dir.parent / "cache"),
            },
            "loss": {"beta": beta, "terms": terms},
            "reference": {"strategy": "auto" if needs_reference else "none"},
            "optim": {
                "optimizer": "adamw",
                "lr": lr,
                "warmup_steps": 0,
                "schedule": "constant",
                "batch_size": s.batch_size,
                "grad_accumulation": s.grad_accumulation,
                "max_steps": steps,
                "weight_decay": 0.0,
                "seed": s.seed,
            },
            "logging": {"run_dir": str(run_dir), "log_every": 1, "progress_bar": False, "plot": False, "tensorboard": False},
            "checkpoint": {"every_steps": checkpoint_every, "keep_last": 1000},
        }
    )


class ShapesExperiment:
    """One experiment in ``out_dir`` (see the module docstring); progress goes to ``log``."""

    def __init__(self, settings: ShapesSettings, out_dir: str | Path, *, log: Log | None = None) -> None:
        unknown = set(settings.arms) - set(ARMS)
        if unknown or not 0 <= settings.sft_noise <= 1:
            raise ConfigError(
                f"shapes experiment: unknown arms {sorted(unknown)} (choose from {list(ARMS)}) or sft_noise outside [0, 1]"
            )
        self.s = settings
        self.out = Path(out_dir)
        self.log: Log = log or (lambda line: None)
        self.store = ResultStore(self.out / "points", settings.key(), self.log)
        self.timings: dict[str, float] = {}
        self.greedy: dict[str, dict[str, float]] = {}
        self.training: dict[str, dict[str, float]] = {}

    # -- data, model, SFT --------------------------------------------------------------------------

    def prepare(self) -> None:
        """The tiny VLM, the three data files and the SFT model (each made once per settings)."""
        s, start = self.s, time.time()
        data = self.out / "data"
        marker = data / "settings_key"
        if not marker.is_file() or marker.read_text() != s.key():
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(self.out / "runs", ignore_errors=True)
            data.mkdir(parents=True)
            build_tiny_vlm(
                self.out / "model",
                "llava",
                seed=s.seed,
                hidden_size=s.hidden_size,
                layers=s.layers,
                image_size=s.image_size,
                patch_size=s.patch_size,
            )
            size = s.image_size
            _write_jsonl(
                noisy_sft_rows(shapes_rows(data, s.sft_rows, seed=s.seed + 1, size=size), s.sft_noise, s.seed), data / "sft.jsonl"
            )
            _write_jsonl(shapes_rows(data, s.pairs, seed=s.seed + 2, size=size), data / "pairs.jsonl")
            _write_jsonl(shapes_rows(data, s.eval_images, seed=s.seed + 3, size=size), data / "eval.jsonl")
            marker.write_text(s.key())
        self.sft_dir = self.out / "runs" / "sft" / "final"
        if not (self.sft_dir / "config.json").is_file():
            from dpokit.training import run

            shutil.rmtree(self.out / "runs" / "sft", ignore_errors=True)
            self.log(f"SFT: {s.sft_steps} steps on {s.sft_rows} demonstrations ({s.sft_noise:.0%} name a random colour)")
            cfg = trainer_config(
                s,
                model=self.out / "model",
                data=data / "sft.jsonl",
                run_dir=self.out / "runs" / "sft",
                terms=[{"name": "sft"}],
                beta=0.1,
                steps=s.sft_steps,
                lr=s.sft_lr,
                checkpoint_every=s.sft_steps,
            )
            run(cfg)
        self.timings["prepare"] = time.time() - start
        self._load_evaluation()

    def _load_evaluation(self) -> None:
        from dpokit.data.images import decode_image
        from dpokit.data.prompts import read_prompt_rows
        from dpokit.generation import encode_prompts
        from dpokit.models import LoadOptions, load_policy

        self.reference = load_policy(self.sft_dir, LoadOptions(dtype="float32", device="cpu"))
        rows = read_prompt_rows(self.out / "data" / "eval.jsonl", images=True)
        self.images = [list(row.images) for row in rows]
        tokenizer, processor = self.reference.tokenizer, self.reference.processor
        _, self.prompt_ids = encode_prompts(tokenizer, [row.prompt for row in rows], images=self.images, processor=processor)
        self.truth = [shape_colour(decode_image(group[0])) for group in self.images]

    # -- evaluation --------------------------------------------------------------------------------

    def _generate(self, model: Any, temperature: float, num_samples: int, reference: Any = None) -> tuple[list[Any], list[float]]:
        from dpokit.generation import SamplingConfig, decode_completions, generate, stop_token_ids
        from dpokit.models import pad_id_of

        tokenizer = self.reference.tokenizer
        sampling = SamplingConfig(self.s.max_new_tokens, temperature, 1.0, 0, num_samples, self.s.seed + 7)
        completions = generate(
            model,
            self.prompt_ids,
            sampling,
            stop_token_ids=stop_token_ids(tokenizer),
            pad_token_id=pad_id_of(tokenizer),
            reference=reference,
            images=self.images,
            image_processor=self.reference.processor.image_processor,
        )
        texts = decode_completions(tokenizer, completions)
        rewards = colour_reward([""] * len(texts), texts, [self.images[c.prompt_index] for c in completions])
        return completions, rewards

    @torch.no_grad()
    def answer_slot(self, model: Any) -> dict[str, float]:
        """After the prompt and "It is" (teacher-forced), averaged over the held-out images: ``answer_start``,
        P("It is" | x); ``colour_mass``, the probability that the next token is one of the colour words; and
        ``colour_choice``, the probability of the right colour among them (empty when a colour word is not
        one token after "It is")."""
        from dpokit.generation import completion_logps
        from dpokit.models import pad_id_of

        tokenizer = self.reference.tokenizer
        start = tokenizer("It is", add_special_tokens=False)["input_ids"]
        answers = {c: tokenizer(f"It is {c}", add_special_tokens=False)["input_ids"] for c in COLOURS}
        if any(ids[:-1] != start for ids in answers.values()):
            return {}
        n = len(self.prompt_ids)

        def logps(completion: list[int]) -> torch.Tensor:
            return completion_logps(
                model,
                self.prompt_ids,
                [completion] * n,
                pad_token_id=pad_id_of(tokenizer),
                batch_size=64,
                images=self.images,
                image_processor=self.reference.processor.image_processor,
            )

        prefix = logps(start)
        slot = {c: (logps(ids) - prefix).exp() for c, ids in answers.items()}  # P(colour | x, "It is"), (N,)
        mass = sum(slot.values(), torch.zeros(n, dtype=torch.float64))
        right = torch.stack([slot[self.truth[i]][i] for i in range(n)])
        return {
            "answer_start": float(prefix.exp().mean()),
            "colour_mass": float(mass.mean()),
            "colour_choice": float((right / mass.clamp(min=1e-300)).mean()),
        }

    def evaluate(self, model: Any, *, method: str, run: str, step: int, beta: float | None) -> FrontierPoint:
        """``model``'s greedy accuracy (kept in ``greedy``) and its point: sampled accuracy and KL to the SFT model."""
        _, greedy = self._generate(model, 0.0, 1)
        low, high = wilson(sum(greedy), len(greedy))
        accuracy = sum(greedy) / len(greedy)
        self.greedy[f"{run}@{step}"] = {"accuracy": accuracy, "ci_low": low, "ci_high": high, "n": len(greedy)}
        self.greedy[f"{run}@{step}"].update(self.answer_slot(model))
        completions, rewards = self._generate(model, 1.0, self.s.samples_per_prompt, reference=self.reference.model)
        kls = [c.policy_logp - c.reference_logp for c in completions]
        point = FrontierPoint(
            method=method,
            run=run,
            step=step,
            beta=beta,
            reward_mean=_mean(rewards),
            reward_sem=_sem(rewards),
            kl_mean=_mean(kls),
            kl_sem=_sem(kls),
            num_samples=len(rewards),
            mean_length=_mean([len(c.content_ids) for c in completions]),
        )
        self.log(
            f"  {run} step {step}: greedy accuracy {sum(greedy) / len(greedy):.3f}, sampled {point.reward_mean:.3f}, "
            f"KL {point.kl_mean:.3f}"
        )
        return point

    # -- the arms ----------------------------------------------------------------------------------

    def arm_runs(self) -> list[tuple[str, str, list[dict[str, Any]], float | None]]:
        """``(run, method, terms, beta)`` of every run the settings' arms ask for."""
        s = self.s
        runs: list[tuple[str, str, list[dict[str, Any]], float | None]] = []
        if "dpo" in s.arms:
            runs += [(f"dpo-beta{b:g}", ARM_LABELS["dpo"], [{"name": "sigmoid"}], b) for b in s.betas]
        if "dpo+nll" in s.arms:
            runs.append(
                (f"dpo-nll-beta{s.betas[0]:g}", ARM_LABELS["dpo+nll"], [{"name": "sigmoid"}, {"name": "sft"}], s.betas[0])
            )
        if "preferred-ft" in s.arms:
            runs.append(("preferred-ft", ARM_LABELS["preferred-ft"], [{"name": "sft"}], None))
        if "online" in s.arms:
            runs.append((f"online-beta{s.betas[0]:g}", ARM_LABELS["online"], [{"name": "sigmoid"}], s.betas[0]))
        return runs

    def online_config(self, cfg: Any) -> Any:
        """``cfg`` (an arm's trainer config) made an online run: one round per optimizer step, each sampling
        ``online_samples`` answers to as many of the pairs' prompts (with their images) as a step holds rows,
        labelled by the ground truth (:data:`ONLINE_JUDGE`), best against worst (ties dropped), the SFT
        model the fixed reference."""
        s = self.s
        cfg.data.train_path = None
        cfg.optim.max_steps = None
        cfg.reference.strategy = "copy"
        online = cfg.online
        online.prompts_path = str(self.out / "data" / "pairs.jsonl")
        online.rounds, online.steps_per_round = s.steps, 1
        online.prompts_per_round = s.batch_size * s.grad_accumulation
        online.samples_per_prompt = s.online_samples
        online.pairs, online.judge, online.reference = "best_vs_worst", ONLINE_JUDGE, "fixed"
        online.sampling.max_new_tokens = s.max_new_tokens
        online.sampling.temperature = 1.0
        return cfg

    def run_arm(self, run: str, method: str, terms: list[dict[str, Any]], beta: float | None) -> list[FrontierPoint]:
        """One trainer run from the SFT model on the pairs, every checkpoint evaluated (stored once done)."""
        from dpokit.analysis.frontier import find_checkpoints
        from dpokit.models import LoadOptions, load_policy
        from dpokit.training import run as train

        stored = self.store.load(run)
        if stored is not None:
            self.timings[run] = stored.seconds
            for measure in stored.measures:
                if "greedy" in measure:
                    self.greedy[measure["key"]] = measure["greedy"]
                self.training[run] = measure.get("training", self.training.get(run, {}))
            return stored.points
        start, run_dir = time.time(), self.out / "runs" / run
        shutil.rmtree(run_dir, ignore_errors=True)
        self.log(f"{run}: {self.s.steps} steps, lr {self.s.lr:g}, checkpoint every {self.s.checkpoint_every}")
        cfg = trainer_config(
            self.s,
            model=self.sft_dir,
            data=self.out / "data" / "pairs.jsonl",
            run_dir=run_dir,
            terms=terms,
            beta=beta if beta is not None else 0.1,
            steps=self.s.steps,
            lr=self.s.lr,
            checkpoint_every=self.s.checkpoint_every,
        )
        if method == ARM_LABELS["online"]:
            from dpokit.online import run_online

            run_online(self.online_config(cfg))
        else:
            train(cfg)
        points = []
        for step, path in find_checkpoints(run_dir):
            if step is not None:
                policy = load_policy(path, LoadOptions(dtype="float32", device="cpu")).model
                points.append(self.evaluate(policy, method=method, run=run, step=step, beta=beta))
        self.training[run] = training_log(run_dir)
        measures: list[dict[str, Any]] = [{"key": f"{run}@{p.step}", "greedy": self.greedy[f"{run}@{p.step}"]} for p in points]
        measures.append({"training": self.training[run]})
        self.timings[run] = time.time() - start
        self.store.save(run, StoredRun(points=points, seconds=self.timings[run], measures=measures))
        return points

    def run(self) -> ShapesResult:
        """Prepare, evaluate the SFT model, run every arm; write ``results.json``, ``results.md``, ``frontier.png``."""
        from dpokit.analysis.frontier import write_results

        start = time.time()
        self.prepare()
        points = [self.evaluate(self.reference.model, method=ARM_LABELS["sft"], run="sft", step=0, beta=None)]
        for arm in self.arm_runs():
            points += self.run_arm(*arm)
        self.timings["total"] = time.time() - start
        result = ShapesResult(
            points=points,
            greedy=self.greedy,
            training=self.training,
            settings=self.s,
            timings_seconds={k: round(v, 1) for k, v in self.timings.items()},
            date=time.strftime("%Y-%m-%d"),
        )
        title = "Shapes (tiny LLaVA): sampled accuracy vs KL to the SFT model"
        write_results(points, self.out, title=title, extra=result.summary())
        (self.out / "results.md").write_text(summary_markdown(result), encoding="utf-8")
        return result


def training_log(run_dir: Path) -> dict[str, float]:
    """A run's ``logps/chosen`` and ``logps/rejected`` (summed over the answer's tokens) at its first and last
    training record: where the probability of the answers went."""
    from dpokit.training.tracking import read_metrics

    records = [r for r in read_metrics(run_dir, split="train") if "logps/chosen" in r]
    if not records:
        return {}
    out = {}
    for name, record in (("first", records[0]), ("last", records[-1])):
        for key in ("logps/chosen", "logps/rejected"):
            if isinstance(record.get(key), (int, float)):
                out[f"{key}@{name}"] = float(record[key])
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _sem(values: Sequence[float]) -> float:
    if len(values) < 2:
        return math.nan
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def summary_markdown(result: ShapesResult) -> str:
    """The experiment's table: every evaluated model, greedy and sampled accuracy and KL with 95% intervals
    and its answer slot; then each run's chosen / rejected log-probs at its first and last training step."""
    lines = [
        "| model | step | greedy accuracy [95% CI] | sampled accuracy [95% CI] | KL to SFT (nats) [95% CI] "
        '| P(colour after "It is") | P(right colour \\| a colour) |',
        "|---|---|---|---|---|---|---|",
    ]
    for p in result.points:
        g = result.greedy.get(f"{p.run}@{p.step}", {})
        name = ARM_LABELS["sft"] if p.run == "sft" else p.method + ("" if p.beta is None else f" β={p.beta:g}")
        lines.append(
            f"| {name} | {p.step} "
            f"| {g.get('accuracy', math.nan):.3f} [{g.get('ci_low', math.nan):.3f}, {g.get('ci_high', math.nan):.3f}] "
            f"| {p.reward_mean:.3f} [{p.reward_mean - Z95 * p.reward_sem:.3f}, {p.reward_mean + Z95 * p.reward_sem:.3f}] "
            f"| {p.kl_mean:.3f} [{p.kl_mean - Z95 * p.kl_sem:.3f}, {p.kl_mean + Z95 * p.kl_sem:.3f}] "
            f"| {g.get('colour_mass', math.nan):.3f} | {g.get('colour_choice', math.nan):.3f} |"
        )
    lines += ["", "| run | logps/chosen first → last | logps/rejected first → last |", "|---|---|---|"]
    for run, log in result.training.items():
        keys = ("logps/chosen", "logps/rejected")
        cells = [f"{log.get(f'{k}@first', math.nan):.2f} → {log.get(f'{k}@last', math.nan):.2f}" for k in keys]
        lines.append(f"| {run} | {cells[0]} | {cells[1]} |")
    s = result.settings
    lines += [
        "",
        f"{s.eval_images} held-out images; greedy: one answer each (Wilson interval); sampled: {s.samples_per_prompt} "
        "answers each at temperature 1 (normal interval). Reward = the answer names the shape's colour and no other. "
        'The last two columns are teacher-forced after "It is", averaged over the images.',
    ]
    return "\n".join(lines) + "\n"


def run_shapes_experiment(
    mode: str | ShapesSettings = "full", out_dir: str | Path = "runs/shapes", *, threads: int = 1, log: Log | None = None
) -> ShapesResult:
    """Run the experiment with a named mode (``full``, ``quick``) or explicit settings on ``threads`` torch threads."""
    from dpokit.experiments.sentiment import resolve_mode, torch_threads

    with torch_threads(threads):
        torch.manual_seed(0)
        return ShapesExperiment(resolve_mode(mode, MODES), out_dir, log=log).run()
