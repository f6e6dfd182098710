"""`dpokit eval`: preference accuracy, mean margin and loss of a saved model on a preference file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpokit.commands.main import main
from dpokit.data import prepare_dataset
from dpokit.models import load_policy
from tests.helpers import tiny_llama, tiny_tokenizer

BETA = 0.5
PAIRS = [
    ("the movie was", " very good.", " very bad."),
    ("i think the plot", " is wonderful.", " is boring."),
    ("tell me about the actor", " he is great.", " he is awful."),
    ("the music", " was the best.", " was the worst."),
    ("so the story", " is funny and sad.", " is long."),
]


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the tokenized-data cache goes to ./.dpokit_cache


def _save_model(directory, seed):
    tiny_llama(seed=seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) for p, c, r in PAIRS) + "\n")
    return _save_model(root / "policy", 0), _save_model(root / "reference", 1), data


def _summed_logp(model, prompt_ids, response_ids) -> float:
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        log_probs = model(ids).logits[0].log_softmax(-1)
    return sum(float(log_probs[t - 1, ids[0, t]]) for t in range(len(prompt_ids), ids.shape[1]))


def test_eval_reports_accuracy_margin_and_dpo_loss_matching_a_plain_forward(setup, tmp_path, capsys):
    """Per pair: margin m = beta * ((lp_w - lr_w) - (lp_l - lr_l)); loss = -log sigmoid(m) = log(1 + e^-m);
    accuracy = fraction with m > 0. Each log-prob is recomputed here by an ordinary forward pass."""
    policy_dir, reference_dir, data = setup
    output = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "--model",
            str(policy_dir),
            "--reference",
            str(reference_dir),
            "--data",
            str(data),
            "--beta",
            str(BETA),
            "--batch-size",
            "2",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    result = json.loads(output.read_text())
    policy, reference = load_policy(policy_dir).model, load_policy(reference_dir).model
    items = prepare_dataset(data, tiny_tokenizer(), use_cache=False).items
    margins = []
    for item in items:
        prompt, (chosen, rejected) = item["prompt_ids"], item["response_ids"]
        chosen_ratio = _summed_logp(policy, prompt, chosen) - _summed_logp(reference, prompt, chosen)
        rejected_ratio = _summed_logp(policy, prompt, rejected) - _summed_logp(reference, prompt, rejected)
        margins.append(BETA * (chosen_ratio - rejected_ratio))
    metrics = result["metrics"]
    assert result["num_examples"] == len(PAIRS)
    assert metrics["rewards/accuracies"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert metrics["rewards/margins"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    assert metrics["loss"] == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / len(margins), abs=1e-4)
    printed = capsys.readouterr().out
    assert "rewards/accuracies" in printed and "reference model" in printed


def test_eval_of_a_model_against_itself_has_zero_margin_and_loss_log_2(setup, tmp_path, capsys):
    policy_dir, _, data = setup
    per_example = tmp_path / "per_example.jsonl"
    code = main(
        [
            "eval",
            "--model",
            str(policy_dir),
            "--reference",
            str(policy_dir),
            "--data",
            str(data),
            "--json",
            "--per-example",
            str(per_example),
        ]
    )
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/accuracies"] == 0.5  # every pair ties, and a tie counts half
    rows = [json.loads(line) for line in per_example.read_text().splitlines()]
    assert [row["example_id"] for row in rows] == list(range(len(PAIRS)))
    assert all(row["loss"] == pytest.approx(math.log(2), abs=1e-6) for row in rows)


def test_eval_with_ipo_loss_reports_the_ipo_objective(setup, capsys):
    """IPO per pair: (h - 1/(2 beta))^2 with h the log-ratio margin; with pi == pi_ref, h = 0 so the loss is 1/(4 beta^2)."""
    policy_dir, _, data = setup
    assert (
        main(
            [
                "eval",
                "--model",
                str(policy_dir),
                "--reference",
                str(policy_dir),
                "--data",
                str(data),
                "--loss",
                "ipo",
                "--beta",
                "0.5",
                "--json",
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["loss"] == pytest.approx(1.0, abs=1e-6)


def test_eval_without_data_or_with_a_bad_loss_is_a_clear_error(setup, capsys):
    policy_dir, reference_dir, data = setup
    assert main(["eval", "--model", str(policy_dir), "--reference", str(reference_dir)]) == 2
    assert "--data" in capsys.readouterr().err
    assert (
        main(["eval", "--model", str(policy_dir), "--reference", str(reference_dir), "--data", str(data), "--loss", "nope"]) == 2
    )
    assert "unknown loss 'nope'" in capsys.readouterr().err
