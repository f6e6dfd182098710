"""`dpokit score`: r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) per response, sigmoid(r_w - r_l) per pair."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpokit.analysis.score import read_score_rows
from dpokit.commands.main import main
from dpokit.data import PreferenceExample, prepare_from_examples
from dpokit.errors import DataError
from dpokit.models import load_policy
from dpokit.scoring import ScoreRow, policy_runner, score_rows
from dpokit.training.reference import CopyReference, NoReference
from tests.helpers import tiny_llama, tiny_tokenizer

BETA = 0.25


def _save_model(directory, seed):
    tiny_llama(seed=seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("policy"), seed=0)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("reference"), seed=1)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, policy_dir):
    """A LoRA adapter over ``policy_dir`` whose B matrices start at zero: policy == base exactly."""
    from transformers import AutoModelForCausalLM

    from dpokit.config import LoraConfig
    from dpokit.models import apply_lora

    base = AutoModelForCausalLM.from_pretrained(policy_dir)
    adapter = apply_lora(base, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    directory = tmp_path_factory.mktemp("adapter")
    adapter.save_pretrained(directory)
    return directory


def _summed_logp(model, prompt_ids, response_ids) -> float:
    """log pi(y|x) by a plain forward: sum over response positions t of log softmax(logits[t-1])[y_t]."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        log_probs = model(ids).logits[0].log_softmax(-1)
    start = len(prompt_ids)
    return sum(float(log_probs[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))


def test_scores_equal_beta_times_policy_minus_reference_logps(policy_dir, reference_dir):
    policy = load_policy(policy_dir)
    reference = load_policy(reference_dir)
    rows = [
        ScoreRow("the movie was", [" very good.", " boring and long."], "row 1"),
        ScoreRow(
            [{"role": "user", "content": "tell me about the film"}], [[{"role": "assistant", "content": "it is great"}]], "row 2"
        ),
        ScoreRow("i liked", [" the actor.", " the plot.", " the music and the scene."], "row 3"),
    ]
    scored = score_rows(policy_runner(policy), policy.tokenizer, CopyReference(reference.model), rows, beta=BETA, batch_size=2)
    for row, result in zip(rows, scored, strict=True):
        responses = row.responses if len(row.responses) > 1 else row.responses * 2
        item = prepare_from_examples([PreferenceExample(row.prompt, responses)], policy.tokenizer, drop_identical=False).items[0]
        for k in range(len(row.responses)):
            expected = BETA * (
                _summed_logp(policy.model, item["prompt_ids"], item["response_ids"][k])
                - _summed_logp(reference.model, item["prompt_ids"], item["response_ids"][k])
            )
            assert result.rewards[k] == pytest.approx(expected, abs=1e-4)
    pair = scored[0]
    assert pair.preference_prob == pytest.approx(1 / (1 + math.exp(-(pair.rewards[0] - pair.rewards[1]))), abs=1e-6)
    assert scored[1].preference_prob is None and len(scored[1].rewards) == 1
    assert scored[2].best_prob == pytest.approx(torch.softmax(torch.tensor(scored[2].rewards), 0).tolist(), abs=1e-6)
    assert abs(pair.rewards[0]) > 1e-3  # different random models: a real, non-zero reward


def test_policy_equal_to_reference_scores_zero_and_probability_one_half(policy_dir, tmp_path, capsys):
    output = tmp_path / "scores.jsonl"
    code = main(
        [
            "score",
            "--model",
            str(policy_dir),
            "--reference",
            str(policy_dir),
            "--prompt",
            "the film was",
            "--response",
            " wonderful.",
            "--response",
            " awful.",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    row = json.loads(output.read_text())
    assert row["rewards"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert row["preference_prob"] == pytest.approx(0.5, abs=1e-6)
    assert "P(first preferred) = 0.5000" in capsys.readouterr().out


def test_lora_adapter_is_scored_against_its_base_with_the_adapter_disabled(lora_dir, tmp_path):
    rows_file = tmp_path / "pairs.jsonl"
    rows_file.write_text(json.dumps({"prompt": "i loved", "chosen": " the music.", "rejected": " nothing."}) + "\n")
    output = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(lora_dir), "--input", str(rows_file), "--output", str(output), "--beta", "0.5"]) == 0
    row = json.loads(output.read_text())
    # A fresh adapter (B = 0) leaves the model unchanged, so pi == pi_ref.
    assert row["rewards"] == pytest.approx([0.0, 0.0], abs=1e-5)
    assert row["policy_logps"][0] == pytest.approx(row["reference_logps"][0], abs=1e-5)
    assert row["policy_logps"][0] < 0


def test_reference_free_reward_is_beta_times_policy_logp(policy_dir, tmp_path):
    output = tmp_path / "scores.jsonl"
    assert (
        main(
            [
                "score",
                "--model",
                str(policy_dir),
                "--reference-free",
                "--beta",
                "0.1",
                "--prompt",
                "a",
                "--response",
                " good movie.",
                "--output",
                str(output),
                "--json",
            ]
        )
        == 0
    )
    row = json.loads(output.read_text())
    assert row["rewards"][0] == pytest.approx(0.1 * row["policy_logps"][0], rel=1e-6)
    assert "reference_logps" not in row


def test_a_full_model_without_a_reference_is_a_clear_error(policy_dir, capsys):
    assert main(["score", "--model", str(policy_dir), "--prompt", "a", "--response", "b"]) == 2
    assert "--reference" in capsys.readouterr().err


def test_score_input_rows_accept_pairs_lists_single_responses_and_csv(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps(r)
            for r in (
                {"prompt": "p", "response": "one"},
                {"prompt": "p", "responses": ["a", "b", "c"]},
                {
                    "prompt": [{"role": "user", "content": "q"}],
                    "chosen": [{"role": "assistant", "content": "x"}],
                    "rejected": [{"role": "assistant", "content": "y"}],
                },
            )
        )
    )
    rows = read_score_rows(jsonl)
    assert [len(r.responses) for r in rows] == [1, 3, 2]
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text('prompt,chosen,rejected\nthe film,"good, really",bad\n')
    assert read_score_rows(csv_file)[0].responses == ["good, really", "bad"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"}\n')
    with pytest.raises(DataError, match=r"broken.jsonl:line 2: no responses"):
        read_score_rows(broken)


def test_truncated_responses_are_reported(policy_dir, caplog):
    policy = load_policy(policy_dir)
    rows = [ScoreRow("the movie", [" was very very very very good and the plot was long.", " bad."], "row 1")]
    with caplog.at_level("WARNING"):
        score_rows(policy_runner(policy), policy.tokenizer, NoReference(), rows, beta=0.1, max_length=6, max_prompt_length=2)
    assert "cut to max_length=6" in caplog.text


def test_chat_scoring_uses_the_chat_template_and_mixed_rows_become_chat(policy_dir, tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text(
        json.dumps({"prompt": [{"role": "user", "content": "how was the film"}], "response": "it was great"}) + "\n"
    )
    (row,) = read_score_rows(rows_file)
    assert row.responses == [[{"role": "assistant", "content": "it was great"}]]
    output = tmp_path / "scores.jsonl"
    assert (
        main(
            [
                "score",
                "--model",
                str(policy_dir),
                "--reference",
                str(policy_dir),
                "--chat",
                "--prompt",
                "how was the film",
                "--response",
                "it was great",
                "--response",
                "it was bad",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    scored = json.loads(output.read_text())
    assert scored["prompt"] == [{"role": "user", "content": "how was the film"}]
    assert scored["preference_prob"] == pytest.approx(0.5, abs=1e-6)
    policy = load_policy(policy_dir)
    # The summed log-prob covers the templated assistant turn: its tokens end with <|im_end|>.
    item = prepare_from_examples([PreferenceExample(scored["prompt"], scored["responses"])], policy.tokenizer).items[0]
    assert policy.tokenizer.decode(item["response_ids"][0]).startswith("it was great<|im_end|>")
    assert scored["policy_logps"][0] == pytest.approx(
        _summed_logp(policy.model, item["prompt_ids"], item["response_ids"][0]), abs=1e-4
    )
