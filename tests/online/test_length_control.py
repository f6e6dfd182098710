"""Self-labelling with length control: the label forms by hand-worked numbers, their config keys, and one
real online round per option on a tiny Llama."""

from __future__ import annotations

import pytest

from dpokit.config import load_config
from dpokit.errors import ConfigError, TrainingError
from dpokit.online import run_online
from dpokit.online.labelling import SelfLabeller, check_rewards, scored_tokens, self_reward
from dpokit.online.pairs import build_rows
from dpokit.online.records import RoundFiles
from dpokit.training.tracking import read_metrics
from tests.online.test_rounds import COUNTING_JUDGE, assets, make_config  # noqa: F401  (assets: the fixture)


def _completion(policy_logp: float, reference_logp: float, num_tokens: int, stopped: bool) -> dict[str, object]:
    return {"policy_logp": policy_logp, "reference_logp": reference_logp, "num_tokens": num_tokens, "stopped": stopped}


# A long completion with a large log-ratio and a short one with a small one:
# long: log-ratio -10 - (-16) = 6 over 19 tokens + its stop token = |y| 20; short: -30 - (-32) = 2 over 4 tokens, cut off.
LONG, SHORT = _completion(-10.0, -16.0, 19, True), _completion(-30.0, -32.0, 4, False)


def test_each_self_label_form_matches_its_formula_by_hand():
    """beta 0.5, alpha 0.1. implicit: 0.5 * 6 = 3 and 0.5 * 2 = 1 (the long one wins). length_regularized:
    3 - 0.1 * 20 = 1 and 1 - 0.1 * 4 = 0.6 (the long one still wins, by less). length_normalized: 3 / 20 =
    0.15 and 1 / 4 = 0.25 (the short one wins)."""
    assert scored_tokens(LONG) == 20 and scored_tokens(SHORT) == 4
    labels = {
        form: SelfLabeller(0.5, form, alpha).label(["p", "p"], [LONG, SHORT])
        for form, alpha in (("implicit", 0.0), ("length_regularized", 0.1), ("length_normalized", 0.0))
    }
    assert labels["implicit"] == pytest.approx([3.0, 1.0])
    assert labels["length_regularized"] == pytest.approx([1.0, 0.6])
    assert labels["length_normalized"] == pytest.approx([0.15, 0.25])
    assert self_reward(6.0, 0, beta=0.5, form="length_normalized") == 3.0  # |y| is at least 1
    with pytest.raises(ConfigError, match="online.self_reward must be one of"):
        self_reward(6.0, 20, beta=0.5, form="per_word")


def test_zero_log_ratios_stop_the_run_even_behind_a_length_term():
    """Policy = reference: every log-ratio 0, but -alpha * |y| is not; the check looks at the log-ratios."""
    labeller = SelfLabeller(0.5, "length_regularized", 0.1)
    scores = labeller.label(["p", "p"], [_completion(-5.0, -5.0, 9, True), _completion(-2.0, -2.0, 3, False)])
    assert scores == pytest.approx([-1.0, -0.3])
    with pytest.raises(TrainingError, match="implicit reward of 0"):
        check_rewards(labeller, scores, "online round 0")
    check_rewards(SelfLabeller(0.5, "length_regularized", 0.1), [-1.0], "r")  # nothing labelled yet: nothing to say


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["online.self_reward=length_normalized"], "needs online.judge=self"),
        (["online.judge=self", "online.self_reward=length_regularized"], "that form needs it > 0"),
        (["online.judge=self", "online.length_penalty=0.1"], "used by online.self_reward=length_regularized only"),
        (["online.length_penalty=-1"], "online.length_penalty must be >= 0"),
        (["online.prefer_shorter_within=0.5", "online.pairs=all_pairs"], "not pairs=all_pairs"),
        (["online.prefer_shorter_within=-0.5"], "online.prefer_shorter_within must be >= 0 or null"),
        (["online.self_reward=shortest"], "self_reward"),
    ],
)
def test_length_control_keys_are_validated(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"online.judge={COUNTING_JUDGE}", *overrides])


def _self_labelling_round(assets, run_dir, *overrides):  # noqa: F811
    cfg = make_config(
        assets,
        run_dir,
        f"model.name_or_path={assets / 'dpo_policy'}",
        f"reference.name_or_path={assets / 'model'}",
        "online.judge=self",
        "online.rounds=1",
        "loss.beta=0.5",
        *overrides,
    )
    return RoundFiles(run_online(cfg).run_dir, 0)


@pytest.mark.parametrize(
    ("overrides", "form", "alpha"),
    [
        (["online.self_reward=length_regularized", "online.length_penalty=0.05"], "length_regularized", 0.05),
        (["online.self_reward=length_normalized"], "length_normalized", 0.0),
    ],
)
def test_a_self_labelling_round_labels_with_the_configured_form(assets, tmp_path, overrides, form, alpha):  # noqa: F811
    """Each judgment is the form's formula of its completion's logged log-probs and token count."""
    files = _self_labelling_round(assets, tmp_path / "run", *overrides)
    completions, judgments = files.read("completions"), files.read("judgments")
    for completion, judgment in zip(completions, judgments, strict=True):
        ratio = completion["policy_logp"] - completion["reference_logp"]
        tokens = completion["num_tokens"] + int(completion["stopped"])
        expected = 0.5 * ratio - alpha * tokens if form == "length_regularized" else 0.5 * ratio / tokens
        assert judgment["score"] == pytest.approx(expected)
    assert files.summary()["judgments"]["judge"] == f"self ({form}" + (f", alpha={alpha:g})" if alpha else ")")


def _eos_prone_model_dir(path):
    """A tiny Llama whose EOS row of the output layer points along its mean final hidden state, so that it
    stops after a few tokens now and then (a randomly initialised one almost never stops): completions of
    different lengths."""
    import torch

    from tests.helpers import tiny_llama, tiny_tokenizer

    model = tiny_llama(seed=0)
    ids = torch.randint(5, 384, (16, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean = model.model(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size).mean(dim=0)
        model.lm_head.weight[model.config.eos_token_id] = 2.5 * mean / mean.norm() ** 2
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_a_round_with_the_length_aware_choice_pairs_the_shortest_completion_near_the_best(assets, tmp_path):  # noqa: F811
    """Judged by word count (longer is better), within 3 words of the best the shortest completion is chosen:
    the round's pairs are build_rows' with the sampled token counts, and each chosen completion is no longer
    than any other within 3 of the best."""
    model = _eos_prone_model_dir(tmp_path / "model")
    result = run_online(
        make_config(
            assets, tmp_path / "run", f"model.name_or_path={model}", "online.rounds=1", "online.prefer_shorter_within=3",
            "online.samples_per_prompt=6",
        )
    )  # fmt: skip
    files = RoundFiles(result.run_dir, 0)
    prompts, completions, judgments = files.read("prompts"), files.read("completions"), files.read("judgments")
    k = 6
    texts = [[c["completion"] for c in completions[k * p : k * p + k]] for p in range(len(prompts))]
    scores = [[j["score"] for j in judgments[k * p : k * p + k]] for p in range(len(prompts))]
    stopped = [[c["stopped"] for c in completions[k * p : k * p + k]] for p in range(len(prompts))]
    lengths = [[c["num_tokens"] for c in completions[k * p : k * p + k]] for p in range(len(prompts))]
    expected, report = build_rows(
        [p["prompt"] for p in prompts], texts, scores, mode="best_vs_worst", stopped=stopped, lengths=lengths,
        prefer_shorter_within=3.0,
    )  # fmt: skip
    assert files.read("pairs") == expected and expected
    for row in expected:
        p, chosen = row["prompt_index"], row["sample_indices"][0]
        usable = [i for i in range(k) if texts[p][i].strip()]
        near = [i for i in usable if scores[p][i] >= max(scores[p][j] for j in usable) - 3]
        assert chosen in near and lengths[p][chosen] == min(lengths[p][i] for i in near)
    (record,) = read_metrics(result.run_dir, split="round")
    assert record["pairs/shorter_chosen"] == report.shorter_chosen > 0, report  # the choice changed some pairs
