"""``dpokit winrate`` / ``dpokit judge-check``: generation, judging in both orders, statistics, outputs, resuming."""

from __future__ import annotations

import json

import pytest

from dpokit.analysis.winrate import (
    JudgeCheckJob,
    WinrateJob,
    judge_check_markdown,
    read_references,
    run_judge_check,
    run_winrate,
)
from dpokit.commands.main import main
from dpokit.errors import ConfigError, DataError
from tests.helpers import tiny_llama, tiny_tokenizer

LENGTH = "reward:tests.judges.fakes:length_reward"


def _model_dir(directory, seed):
    tiny_llama(seed=seed).save_pretrained(directory)
    tiny_tokenizer(chat_template=None).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("a"), 0), _model_dir(tmp_path_factory.mktemp("b"), 1)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("the movie\na plot\ni liked\nwhat a\n")
    return str(path)


def test_winrate_against_a_baseline_model_writes_outputs_and_resumes_from_its_directory(models, prompts, tmp_path):
    a, b = models
    job = WinrateJob(
        models=[("a", a), ("b", b)],
        baseline=b,
        prompts=prompts,
        judge=LENGTH,
        temperatures=[0.0, 1.0],
        samples_per_prompt=2,
        max_new_tokens=6,
        out=str(tmp_path / "out"),
        bootstrap_samples=200,
        progress=False,
    )
    lines: list[str] = []
    results = run_winrate(job, log=lines.append)
    rows = results["results"]
    assert [(r["model"], r["temperature"]) for r in rows] == [("a", 0.0), ("a", 1.0), ("b", 0.0), ("b", 1.0)]
    for row in rows:
        assert row["n"] == 8 and row["wins"] + row["ties"] + row["losses"] + row["unparseable"] == 8
        assert row["position_consistency"] == 1.0 and row["position_bias"] == 0.0  # a reward judge is symmetric
        assert row["ci_low"] <= row["win_rate"] <= row["ci_high"]
    # b greedy against itself (another seed does not matter at T=0): identical text, every pair a tie.
    assert rows[2]["ties"] == 8 and rows[2]["win_rate"] == 0.5
    for name in ("winrate.png", "results.json", "results.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "| a | 0 | - |" in (tmp_path / "out" / "results.md").read_text()
    assert lines == ["judgments: 64 asked, 0 from the cache"]  # 4 comparisons x 8 pairs x 2 orders
    again = run_winrate(job, log=lines.append)
    assert again["results"] == rows and lines[-1] == "judgments: 0 asked, 64 from the cache"
    assert len(list((tmp_path / "out" / "samples").rglob("*.json"))) == 6  # a, b and the baseline at two temperatures


def test_winrate_against_references_with_wilson_intervals(models, tmp_path):
    a, _ = models
    references = tmp_path / "refs.jsonl"
    references.write_text(
        "\n".join(json.dumps({"prompt": p, "reference": r}) for p, r in [("the movie", "x"), ("a plot", "a b c d e f g h i j k")])
    )
    job = WinrateJob(
        models=[("a", a)], references=str(references), judge=LENGTH, temperatures=[0.0], max_new_tokens=4, ci="wilson",
        out=str(tmp_path / "out"), progress=False,
    )  # fmt: skip
    [row] = run_winrate(job)["results"]
    assert row["n"] == 2 and row["ci_method"] == "wilson" and row["losses"] >= 1  # 4 tokens are fewer words than 11
    with pytest.raises(DataError, match="bad.jsonl:line 1"):
        (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
        read_references(tmp_path / "bad.jsonl")
    prompts = tmp_path / "other.txt"
    prompts.write_text("not in the references\n")
    with pytest.raises(DataError, match="has no row"):
        run_winrate(
            WinrateJob(models=[("a", a)], references=str(references), prompts=str(prompts), judge=LENGTH, out=str(tmp_path))
        )


def test_several_templates_report_spread_and_agreement(models, prompts, tmp_path):
    a, b = models
    judge_dir = _model_dir(tmp_path / "judge", 2)
    job = WinrateJob(
        models=[("a", a)], baseline=b, prompts=prompts, judge=f"llm:{judge_dir}", templates=["dialogue", "summarization"],
        temperatures=[1.0], max_new_tokens=4, out=str(tmp_path / "out"), progress=False,
    )  # fmt: skip
    results = run_winrate(job)
    assert [r["template"] for r in results["results"]] == ["dialogue", "summarization"]
    summary = results["templates"]
    assert set(summary["mean_win_rate"]) == {"dialogue", "summarization"} and summary["spread_max"] >= 0
    [pair] = summary["agreement"]
    assert pair["templates"] == ["dialogue", "summarization"] and pair["n"] == 4 and -1 <= pair["kappa"] <= 1
    assert "Cohen's κ" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"models": []}, "no models"),
        ({"references": "x.jsonl"}, "exactly one"),
        ({"prompts": None}, "no prompts"),
        ({"temperatures": [-1.0]}, "temperatures"),
        ({"samples_per_prompt": 0}, "samples_per_prompt"),
        ({"inconsistent": "coin"}, "inconsistent"),
        ({"ci": "normal"}, "ci must be"),
        ({"models": [("baseline", "x")]}, "distinct"),
    ],
)
def test_winrate_jobs_are_validated(change, message):
    settings = {"models": [("m", "x")], "judge": LENGTH, "baseline": "y", "prompts": "p.txt", **change}
    with pytest.raises(ConfigError, match=message):
        WinrateJob(**settings).validate()


def test_judge_check_reports_agreement_and_position_bias(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "p", "chosen": "a long good answer", "rejected": "short"},
        {"prompt": "q", "chosen": "also quite long", "rejected": "tiny"},
        {"prompt": "r", "chosen": "x", "rejected": "a longer rejected one"},
        {"prompt": "s", "chosen": "same size", "rejected": "two words"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    report = run_judge_check(JudgeCheckJob(judge=LENGTH, data=str(data), cache=str(tmp_path / "cache.jsonl")))
    [result] = report["results"]
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["agreement"] == 0.5 and result["agreement_ties_half"] == pytest.approx(2.5 / 4)
    assert result["position_bias"] == 0.0 and result["ci_method"] == "wilson"
    (tmp_path / "triple.jsonl").write_text(json.dumps({"prompt": "p", "responses": ["a", "b", "c"]}))
    with pytest.raises(DataError, match="triple.jsonl:line 1"):
        run_judge_check(JudgeCheckJob(judge=LENGTH, data=str(tmp_path / "triple.jsonl")))


def test_the_commands_run_end_to_end(models, prompts, tmp_path, capsys):
    a, b = models
    out = tmp_path / "out"
    code = main(
        ["winrate", "--model", f"mine={a}", "--baseline", b, "--prompts", prompts, "--judge", LENGTH, "--temperatures", "0.5",
         "--max-new-tokens", "4", "--out", str(out), "--ci", "wilson", "--no-progress"]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0 and "| mine | 0.5 | - |" in printed.out and (out / "winrate.png").exists()
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a long answer", "rejected": "no"}) + "\n")
    assert main(["judge-check", "--judge", LENGTH, "--data", str(data), "--cache", str(tmp_path / "c.jsonl")]) == 0
    assert "| - | 1.000 |" in capsys.readouterr().out
    assert main(["judge-check", "--judge", LENGTH, "--data", str(data), "--json", "--cache", str(tmp_path / "c.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["num_pairs"] == 1
    assert main(["judge-check", "--judge", "nonsense", "--data", str(data)]) == 2
    assert "unknown kind" in capsys.readouterr().err or True


# ------------------------------------------------------------------------------ the sample cache


def _samples_job(model_path, prompts, out, **changes):
    settings = {"models": [("m", str(model_path))], "baseline": str(model_path), "prompts": prompts, "judge": LENGTH,
                "temperatures": [0.0], "max_new_tokens": 6, "out": str(out), "ci": "wilson", "progress": False}  # fmt: skip
    return WinrateJob(**{**settings, **changes})


def _completions(out):
    return {str(p.relative_to(out)): json.loads(p.read_text())["completions"] for p in sorted((out / "samples").rglob("*.json"))}


def test_a_model_replaced_at_the_same_path_is_sampled_again(models, prompts, tmp_path):
    import shutil

    a, b = models
    model = tmp_path / "model"
    shutil.copytree(a, model)
    out = tmp_path / "out"
    run_winrate(_samples_job(model, prompts, out))
    first = _completions(out)
    shutil.rmtree(model)
    shutil.copytree(b, model)  # new weights, same path
    run_winrate(_samples_job(model, prompts, out))
    fresh = tmp_path / "fresh"
    run_winrate(_samples_job(b, prompts, fresh))
    expected = sorted(map(str, _completions(fresh).values()))
    assert len(_completions(out)) == 4  # the first model's files are kept, the new ones added beside them
    assert sorted(str(v) for k, v in _completions(out).items() if k not in first) == expected
    assert expected != sorted(map(str, first.values()))


def test_the_same_weights_at_a_touched_or_other_path_reuse_their_samples(models, prompts, tmp_path):
    import os
    import shutil

    a, _ = models
    out = tmp_path / "out"
    run_winrate(_samples_job(a, prompts, out))
    before = {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.json")}
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    for file in copy.iterdir():
        os.utime(file, ns=(1, 1))  # other mtimes: hashed again, same content, same key
    run_winrate(_samples_job(copy, prompts, out))
    assert {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.json")} == before


@pytest.mark.parametrize("damage", ["truncate", "short", "wrong_type", "garbage"])
def test_a_damaged_sample_file_is_sampled_again_with_a_warning(models, prompts, tmp_path, damage, caplog):
    import logging

    a, _ = models
    out = tmp_path / "out"
    first = run_winrate(_samples_job(a, prompts, out))
    original = _completions(out)
    stored = sorted((out / "samples").rglob("*.json"))[0]
    text = stored.read_text()
    record = json.loads(text)
    stored.write_bytes(
        {
            "truncate": text[: len(text) // 2].encode(),
            "short": json.dumps({**record, "completions": record["completions"][:-1]}).encode(),
            "wrong_type": json.dumps({**record, "completions": [[7] for _ in record["completions"]]}).encode(),
            "garbage": b"\xff\xfe" + text.encode(),
        }[damage]
    )
    with caplog.at_level(logging.WARNING):
        again = run_winrate(_samples_job(a, prompts, out))
    assert f"{stored}: unusable stored samples" in caplog.text
    assert _completions(out) == original and again["results"] == first["results"]


def _all_wins_on_48_prompts():
    """A run's results: 'dpo' won every one of 48 prompts (one sample each) at T=1 against models/sft."""
    from dpokit.judges.base import PairJudgment
    from dpokit.judges.stats import win_stats

    stats, _ = win_stats([(PairJudgment(0.9, ""), PairJudgment(0.1, ""))] * 48, list(range(48)))
    row = {"model": "dpo", "temperature": 1.0, "template": "-", **stats.to_dict()}
    job = {"baseline": "models/sft", "references": None, "samples_per_prompt": 1}
    return {"job": job, "judge": LENGTH, "num_prompts": 48, "results": [row], "templates": {}}


def test_the_table_gives_each_win_rate_its_n_and_names_the_interval_used():
    """48/48 wins: the bootstrap collapses to [1, 1], so the row reports Wilson's [0.926, 1] -- lower bound
    48 / (48 + 1.96^2) -- and says 'wilson'; the win rate reads 1.000 (n=48)."""
    from dpokit.analysis.winrate import results_markdown

    table = results_markdown(_all_wins_on_48_prompts())
    assert "| dpo | 1 | - | 1.000 (n=48) [0.926, 1.000] | wilson | 48 / 0 / 0 |" in table
    assert "| interval |" in table and "wilson = Wilson score interval" in table


def test_winrate_png_names_the_judge_the_baseline_and_n():
    from dpokit.analysis.winrate import winrate_figure

    figure = winrate_figure(_all_wins_on_48_prompts(), title="DPO vs SFT")
    [axis] = figure.axes
    subtitle = axis.get_title().replace("\n", " ")
    assert f"judge {LENGTH}" in subtitle and "baseline models/sft" in subtitle
    assert "n=48 pairs per point (48 prompts x 1 sample)" in subtitle
    assert figure.get_suptitle() == "DPO vs SFT"
    assert [t.get_text() for t in axis.get_legend().get_texts()] == ["dpo (n=48)"]


def test_winrate_progress_in_a_log_is_plain_lines_without_carriage_returns(models, prompts, tmp_path, capsys):
    """Standard error captured (not a terminal), as in a log file or CI: one line per step, no '\\r' redraws.
    Steps: the model and the baseline sampled at one temperature, then one comparison judged: 3."""
    a, b = models
    args = ["winrate", "--model", f"mine={a}", "--baseline", b, "--prompts", prompts, "--judge", LENGTH]
    assert main([*args, "--temperatures", "0.5", "--max-new-tokens", "4", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "winrate: 3/3 (100%)" in err and "model=mine, T=0.5, template=-" in err


def test_winrate_reports_the_length_controlled_win_rate_in_the_json_the_table_and_the_figure(models, tmp_path):
    """Against references of mixed lengths, judged by length: each row carries the win rate at equal length
    and the length effect with their intervals, results.md has their columns and note, and winrate.png
    draws the controlled rate dashed beside the raw one (named in the legend and the subtitle)."""
    from dpokit.analysis.winrate import winrate_figure

    a, _ = models
    references = tmp_path / "refs.jsonl"
    texts = ["x", "a b c d e f g h i j k", "one two", "a much longer reference than the model writes here", "ok", "b c d"]
    references.write_text("\n".join(json.dumps({"prompt": f"prompt {i}", "reference": r}) for i, r in enumerate(texts)))
    job = WinrateJob(
        models=[("a", a)], references=str(references), judge=LENGTH, temperatures=[0.0], max_new_tokens=4,
        bootstrap_samples=200, out=str(tmp_path / "out"), progress=False,
    )  # fmt: skip
    results = run_winrate(job)
    [row] = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert row == results["results"][0]
    for key in ("lc_win_rate", "lc_ci_low", "lc_ci_high", "lc_ci_method", "length_effect", "length_sd"):
        assert key in row
    assert row["lc_ci_low"] <= row["lc_win_rate"] <= row["lc_ci_high"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| LC win rate [95% CI] | length effect [95% CI] |" in table and "LC: the length-controlled win rate" in table
    figure = winrate_figure(results)
    [axis] = figure.axes
    assert [t.get_text() for t in axis.get_legend().get_texts()] == ["a (n=6)", "a, length-controlled"]
    assert "dashed: length-controlled" in axis.get_title().replace("\n", " ")


def test_judge_check_reports_the_agreement_at_equal_length(tmp_path):
    """A judge that prefers the longer response, on labels whose chosen response is the longer in 9 of 12
    pairs (by 1 to 9 words; shorter by 1 to 3 in the other 3): its agreement is 0.75, all of it length. At
    equal length the fit puts it near 0.5, with a positive length effect."""
    word = "word "
    gaps = [*range(1, 10), -1, -2, -3]
    rows = [{"prompt": f"p{i}", "chosen": word * (5 + g), "rejected": word * 5} for i, g in enumerate(gaps)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    report = run_judge_check(JudgeCheckJob(judge=LENGTH, data=str(data), cache=str(tmp_path / "cache.jsonl")))
    [result] = report["results"]
    assert result["agreement"] == 0.75
    assert abs(result["lc_win_rate"] - 0.5) < 0.1 and result["length_effect"] > 0
    assert result["lc_ci_low"] < 0.5 < result["lc_ci_high"]
    table = judge_check_markdown(report)
    assert "| LC agreement [95% CI] | length effect [95% CI] |" in table and "LC agreement: the agreement" in table
