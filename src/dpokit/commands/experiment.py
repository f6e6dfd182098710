"""``dpokit experiment`` and ``dpokit demo``: the controlled-sentiment experiment (dpokit.experiments.sentiment)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from dpokit.commands.common import Subcommand, add_engine_arguments, engine_options

if TYPE_CHECKING:
    from dpokit.experiments.online import OnlineExperimentSettings
    from dpokit.experiments.sentiment import DemoResult

EXPERIMENT_DESCRIPTION = (
    "The DPO paper's IMDb sentiment experiment in miniature: a small GPT-2 trained on generated reviews, "
    "VADER as the ground-truth reward, DPO (beta sweep), Preferred-FT, Unlikelihood, ORPO, SimPO, KTO, Best-of-N "
    "and RLOO, each evaluated on the reward-KL frontier; then win rates against the SFT model across temperatures. "
    "'online': the same task with online DPO (labelled by VADER) and self-labelled DPO (a policy trained on 10% of the "
    "pairs labels its own samples with its implicit reward) against offline DPO and the 10% baseline, at equal steps. "
    "'overoptimisation': DPO trained longer for several beta and the online run labelled by VADER, with the ground-truth "
    "reward, the implicit reward and the KL at every checkpoint. "
    "'ood': the sentiment experiment's DPO and RLOO policies on prompts from a shifted text domain (generated news "
    "reports) beside the in-distribution ones, on the reward-KL frontier and by win rate. "
    "'shapes': a vision-language model (a tiny LLaVA built on the spot) answers 'What colour is the shape?' about "
    "images; SFT on noisy answers, then DPO (two beta), DPO + NLL and Preferred-FT on correct-vs-wrong pairs, with the "
    "ground-truth accuracy (greedy and sampled) and the KL to the SFT model on held-out images."
)
EXPERIMENT_EPILOG = """examples:
  dpokit experiment sentiment --mode quick           # the paper's methods, smaller
  dpokit experiment sentiment --mode full             # the reproduction with ORPO, SimPO, KTO and win rates
  dpokit experiment sentiment --methods dpo,best-of-n
  dpokit experiment online --mode quick              # online and self-labelling DPO, smaller
  dpokit experiment online --mode full               # the reported comparison (docs/online/)
  dpokit experiment online --mode quick --seeds 0,1,2  # once per training seed, intervals across seeds
  dpokit experiment overoptimisation --mode full     # reward over-optimisation (docs/overoptimisation/)
  dpokit experiment ood --mode full                  # out-of-distribution generalisation (docs/ood/)
  dpokit experiment shapes --mode full               # a VLM learns colours from preferences (docs/vlm.md)

Measured run times are in docs/experiments.md."""

DEMO_EPILOG = """\
The quick mode of the paper's controlled-sentiment experiment (see `dpokit experiment --help`): a
small GPT-2 trained from scratch on generated movie reviews plays the SFT model (cached after the
first run), pairs of its own completions are labelled by VADER's sentiment score, and DPO teaches it
to write positive continuations. Prints the ground-truth reward and KL(pi || pi_sft) before and after,
with samples of both models for the same prompts, and leaves the DPO run directory with
metrics.jsonl, TensorBoard events and curves.png (its measured run time is in docs/experiments.md).

examples:
  dpokit demo
  dpokit demo --run-dir /tmp/dpokit-demo"""


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.experiments import sentiment, shapes_experiment

    parser.add_argument(
        "name",
        choices=["sentiment", "online", "overoptimisation", "ood", "shapes"],
        help="which experiment: the paper's controlled sentiment, online and self-labelling DPO on the same task, "
        "reward over-optimisation over the course of training, the sentiment policies on a shifted text domain, or "
        "a vision-language model's proof of learning on coloured shapes",
    )
    parser.add_argument(
        "--mode",
        choices=["full", "quick"],
        default="full",
        help="sentiment: full (every method, win rates included) or quick (the paper's methods, smaller); "
        "online, overoptimisation, ood and shapes: full (the reported run) or quick (smaller everything)",
    )
    parser.add_argument("--out", default=None, help="output directory (default runs/<name>-<mode>)")
    parser.add_argument(
        "--cache-dir",
        default=sentiment.DEFAULT_CACHE_DIR,
        help=f"where the SFT model is cached (default {sentiment.DEFAULT_CACHE_DIR})",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"sentiment: comma-separated subset of {','.join(sentiment.ALL_METHODS)}; shapes: of "
        f"{','.join(shapes_experiment.ARMS)} (default: the mode's)",
    )
    parser.add_argument(
        "--self-reward",
        choices=["implicit", "length_regularized", "length_normalized"],
        default=None,
        help="online only: the self-label of (c') -- beta*log-ratio (implicit), minus --length-penalty per token "
        "(length_regularized), or over the token count (length_normalized); a form other than implicit runs (c') alone",
    )
    parser.add_argument(
        "--length-penalty", type=float, default=None, help="online only: alpha per token of --self-reward length_regularized"
    )
    parser.add_argument(
        "--prefer-shorter-within",
        type=float,
        default=None,
        help="online only: the self-labelled arms choose the shortest completion scoring within this of the best",
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="online only: comma-separated training seeds; the experiment runs once per seed (in OUT/seed-N) and "
        "writes OUT/seeds.md and seeds.json with intervals across seeds",
    )
    add_engine_arguments(
        parser,
        vllm="sentiment, online, overoptimisation and ood (not shapes): every evaluation sample (each checkpoint's, "
        "Best-of-N's pool, the win rates') and the online arms' rounds; the server must serve the experiment's SFT "
        "model (the cached directory the experiment logs) with VLLM_SERVER_DEV_MODE=1, as each model is loaded into it "
        "in turn; the KL's log-probs are computed here, and the labelled pairs stay dpokit's seeded SFT samples",
    )
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep run checkpoints after evaluating them")
    parser.add_argument(
        "--threads",
        type=int,
        default=sentiment.DEFAULT_THREADS,
        help=f"torch intra-op threads (default {sentiment.DEFAULT_THREADS}: fastest for these tiny models)",
    )


def method_list(methods: str) -> tuple[str, ...]:
    """``--methods``' comma-separated names."""
    return tuple(m.strip() for m in methods.split(",") if m.strip())


def run_experiment(args: argparse.Namespace) -> int:
    import dataclasses

    from dpokit.analysis.frontier import results_markdown
    from dpokit.experiments.sentiment import MODES
    from dpokit.experiments.sentiment import run_experiment as run_sentiment_experiment

    if args.engine != "dpokit" and args.name == "shapes":
        from dpokit.errors import ConfigError

        raise ConfigError(
            f"--engine {args.engine} does not apply to the shapes experiment: its prompts have images, which only dpokit's "
            "engine samples"
        )
    if args.name == "online":
        return run_online_experiment(args)
    if any(v is not None for v in (args.self_reward, args.length_penalty, args.prefer_shorter_within, args.seeds)):
        from dpokit.errors import ConfigError

        raise ConfigError("--self-reward, --length-penalty, --prefer-shorter-within and --seeds apply to the online experiment")
    if args.name == "overoptimisation":
        return run_overoptimisation(args)
    if args.name == "ood":
        return run_ood(args)
    if args.name == "shapes":
        return run_shapes(args)
    settings = MODES[args.mode]
    if args.methods is not None:
        settings = dataclasses.replace(settings, methods=method_list(args.methods))
    out_dir = args.out or f"runs/sentiment-{args.mode}"
    result = run_sentiment_experiment(
        settings,
        out_dir,
        args.cache_dir,
        keep_checkpoints=args.keep_checkpoints,
        threads=args.threads,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        engine=engine_options(args),
    )
    print(results_markdown(result.points))
    print(f"wrote {out_dir}/frontier.png, results.json, results.md")
    return 0


def run_online_experiment(args: argparse.Namespace) -> int:
    from dpokit.errors import ConfigError
    from dpokit.experiments.online import run_online_experiment as run_online
    from dpokit.experiments.online import summary_markdown

    if args.methods is not None:
        raise ConfigError("--methods applies to the sentiment experiment; the online experiment always runs its four arms")
    settings, suffix = online_length_control(args)
    out_dir = args.out or f"runs/online-{args.mode}{suffix}"
    if args.seeds is not None:
        return run_online_seeds(args, settings, out_dir)
    result = run_online(
        settings,
        out_dir,
        args.cache_dir,
        keep_checkpoints=args.keep_checkpoints,
        threads=args.threads,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        engine=engine_options(args),
    )
    print(summary_markdown(result.summary()))
    print(f"wrote {out_dir}/frontier.png, results.json, results.md")
    return 0


def run_overoptimisation(args: argparse.Namespace) -> int:
    from dpokit.errors import ConfigError
    from dpokit.experiments.overoptimisation import run_overoptimisation_experiment, summary_markdown

    if args.methods is not None:
        raise ConfigError("--methods applies to the sentiment experiment; the over-optimisation experiment runs DPO only")
    out_dir = args.out or f"runs/overoptimisation-{args.mode}"
    result = run_overoptimisation_experiment(
        args.mode,
        out_dir,
        args.cache_dir,
        keep_checkpoints=args.keep_checkpoints,
        threads=args.threads,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        engine=engine_options(args),
    )
    print(summary_markdown(result.curves))
    print(f"wrote {out_dir}/overoptimisation.png, overoptimisation-online.png, results.json, results.md")
    return 0


def run_ood(args: argparse.Namespace) -> int:
    from dpokit.errors import ConfigError
    from dpokit.experiments.ood import run_ood_experiment, summary_markdown

    if args.methods is not None:
        raise ConfigError("--methods applies to the sentiment experiment; the ood experiment evaluates DPO and RLOO")
    out_dir = args.out or f"runs/ood-{args.mode}"
    result = run_ood_experiment(
        args.mode,
        out_dir,
        args.cache_dir,
        keep_checkpoints=args.keep_checkpoints,
        threads=args.threads,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        engine=engine_options(args),
    )
    print(summary_markdown(result))
    print(f"wrote {out_dir}/ood.png, results.json, results.md")
    return 0


def run_shapes(args: argparse.Namespace) -> int:
    import dataclasses

    from dpokit.errors import ConfigError
    from dpokit.experiments.sentiment import resolve_mode
    from dpokit.experiments.shapes_experiment import ARMS, MODES, run_shapes_experiment, summary_markdown

    settings = resolve_mode(args.mode, MODES)
    if args.methods is not None:
        arms = method_list(args.methods)
        unknown = sorted(set(arms) - set(ARMS))
        if unknown or not arms:
            raise ConfigError(f"--methods {args.methods!r}: the shapes experiment's arms are {','.join(ARMS)}")
        settings = dataclasses.replace(settings, arms=arms)
    out_dir = args.out or f"runs/shapes-{args.mode}"
    result = run_shapes_experiment(
        settings, out_dir, threads=args.threads, log=lambda line: print(line, file=sys.stderr, flush=True)
    )
    print(summary_markdown(result))
    print(f"wrote {out_dir}/frontier.png, results.json, results.md")
    return 0


def run_online_seeds(args: argparse.Namespace, settings: OnlineExperimentSettings, out_dir: str) -> int:
    """``dpokit experiment online --seeds ...``: one run per seed, then the intervals across seeds."""
    from dpokit.errors import ConfigError
    from dpokit.experiments import online

    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated whole numbers, got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds needs at least one seed and no seed twice, got {args.seeds!r}")
    aggregate = online.run_online_seeds(
        settings,
        seeds,
        out_dir,
        args.cache_dir,
        keep_checkpoints=args.keep_checkpoints,
        threads=args.threads,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        engine=engine_options(args),
    )
    print(online.seeds_markdown(aggregate))
    print(f"wrote {out_dir}/seed-*/ and {out_dir}/seeds.md, seeds.json")
    return 0


def online_length_control(args: argparse.Namespace) -> tuple[OnlineExperimentSettings, str]:
    """The online experiment's settings of ``--mode`` with the length-control options, and a suffix naming
    them for the default output directory ("" without them)."""
    import dataclasses

    from dpokit.experiments.online import MODES

    settings = MODES[args.mode]
    suffix = ""
    if args.self_reward not in (None, "implicit"):
        penalty = args.length_penalty if args.length_penalty is not None else 0.0
        settings = dataclasses.replace(settings, self_reward=args.self_reward, length_penalty=penalty, self_judges=("current",))
        suffix += f"-{args.self_reward}" + (f"{penalty:g}" if penalty else "")
    elif args.length_penalty is not None:
        settings = dataclasses.replace(settings, length_penalty=args.length_penalty)  # refused by validation
    if args.prefer_shorter_within is not None:
        settings = dataclasses.replace(settings, prefer_shorter_within=args.prefer_shorter_within)
        suffix += f"-shorter{args.prefer_shorter_within:g}"
    return settings, suffix


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.experiments import sentiment

    parser.add_argument(
        "--run-dir",
        default=sentiment.DEMO_RUN_DIR,
        help=f"where the demo writes its data, DPO run and samples (default: {sentiment.DEMO_RUN_DIR})",
    )
    parser.add_argument(
        "--cache-dir",
        default=sentiment.DEFAULT_CACHE_DIR,
        help=f"where the small SFT model is cached between runs (default: {sentiment.DEFAULT_CACHE_DIR})",
    )


DEMO_INTRO = (
    "dpokit demo: DPO on the miniature of the paper's controlled-sentiment task",
    "  policy: a small GPT-2 trained from scratch on generated movie reviews (the SFT model)",
    "  ground-truth reward: VADER sentiment of prompt + completion, in [-1, 1]",
)


def run_demo(args: argparse.Namespace) -> int:
    from dpokit.experiments.sentiment import run_sentiment_demo

    print("\n".join(DEMO_INTRO), flush=True)
    result = run_sentiment_demo(args.run_dir, args.cache_dir, log=lambda line: print("  " + line, flush=True))
    print("\n".join(demo_report(result)))
    return 0


def demo_report(result: DemoResult) -> list[str]:
    """``dpokit demo``'s report: the held-out evaluations during DPO, reward and KL before and after, and
    samples of both models for the same prompts."""
    from dpokit.experiments.sentiment import online_example_command

    lines = [
        "",
        "held-out preference pairs during DPO (the implicit reward r = beta * log pi/pi_sft):",
        f"{'step':>6s} {'reward accuracy':>16s} {'margin':>8s} {'loss':>7s}",
        f"{0:6d} {'(ties)':>16s} {0.0:8.3f} {0.6931:7.4f}   <- policy = reference: every reward is 0",
    ]
    lines += [
        f"{r['step']:6d} {r['rewards/accuracies']:16.3f} {r['rewards/margins']:8.3f} {r['loss']:7.4f}" for r in result.evals
    ]
    lines += [
        "",
        f"{'':24s} {'reward':>8s} {'KL(pi||pi_sft)':>16s}",
        f"{'before (SFT model)':24s} {result.before.reward_mean:8.3f} {0.0:16.2f}",
        f"{f'after DPO (beta={result.beta:g})':24s} {result.after.reward_mean:8.3f} {result.after.kl_mean:16.2f}",
        f"(means over {result.before.num_samples} samples for {result.num_eval_prompts} held-out prompts; "
        "KL in nats per completion)",
        "",
    ]
    # Both evaluations sample with the same seed over the same prompts, so sample i of each answers the
    # same prompt; no examples are shown when the DPO run left none.
    pairs = list(zip(result.before_samples, result.after_samples, strict=False))
    for b, a in pairs[:: result.eval_samples_per_prompt][:3]:
        lines += [
            f"prompt: {b['prompt']!r}",
            f"  SFT  [{b['reward']:+.2f}] {b['completion'].strip()}",
            f"  DPO  [{a['reward']:+.2f}] {a['completion'].strip()}",
        ]
    lines.append(f"\ndone in {result.seconds:.0f}s; run directory (metrics.jsonl, tensorboard/, curves.png): {result.run_dir}")
    lines.append(f"next, online DPO from the same SFT model on the same prompts: {online_example_command(result.out_dir)}")
    return lines


EXPERIMENT = Subcommand(
    "experiment",
    "reproduce the paper's controlled-sentiment reward-KL frontier (miniature, CPU)",
    EXPERIMENT_DESCRIPTION,
    EXPERIMENT_EPILOG,
    add_experiment_arguments,
    run_experiment,
)
DEMO = Subcommand(
    "demo",
    "DPO teaches a tiny self-built review model to write positive continuations (under a minute on a CPU)",
    "A self-contained DPO run on the paper's sentiment task in miniature: model, data and reward built on the spot.",
    DEMO_EPILOG,
    add_demo_arguments,
    run_demo,
)
