"""``dpokit judge-check`` tells the user when a judge's verdicts cannot be read, and shows progress.

The judge here is a real reward function (``reward:`` spec, imported from this module) that cannot
score short responses (NaN), so the pairs holding one have no readable verdict in either order; the
``openai:`` case -- an LLM that never follows the verdict format -- runs against a real server in
``tests/judges/test_openai_server.py``.
"""

from __future__ import annotations

import json
import math

import pytest

from dpokit.analysis.winrate import JUDGE_CHECK_CHUNK, JudgeCheckJob, UnreadableJudgeError, run_judge_check
from dpokit.commands.main import main

NAN_WHEN_SHORT = "reward:tests.analysis.test_judge_check:nan_when_short"
ALWAYS_NAN = "reward:tests.analysis.test_judge_check:always_nan"


def nan_when_short(prompts, completions, **_):
    """Words of the completion; NaN (no score) for fewer than three."""
    return [float(len(c.split())) if len(c.split()) >= 3 else math.nan for c in completions]


def always_nan(prompts, completions, **_):
    return [math.nan for _ in completions]


def _pairs(path, readable: int, unreadable: int):
    rows = [{"prompt": f"p{i}", "chosen": "a long good answer", "rejected": "a bad one"} for i in range(readable)]
    rows += [{"prompt": f"q{i}", "chosen": "a long good answer", "rejected": "no"} for i in range(unreadable)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_low_share_of_readable_verdicts_is_a_warning_in_the_log_and_the_report(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl", readable=3, unreadable=7)
    lines: list[str] = []
    job = JudgeCheckJob(judge=NAN_WHEN_SHORT, data=data, cache=str(tmp_path / "cache.jsonl"), progress=False)
    report = run_judge_check(job, log=lines.append)
    [result] = report["results"]
    assert result["readable_verdicts"] == 6 and result["unparseable"] == 7 and result["wins"] == 3
    [warning] = report["warnings"]
    assert lines == [warning]
    assert "only 6 of 20 verdicts (30%)" in warning and "reward A=" in warning  # the first answers are shown
    healthy = run_judge_check(
        JudgeCheckJob(
            judge=NAN_WHEN_SHORT, data=_pairs(tmp_path / "ok.jsonl", 8, 2), cache=str(tmp_path / "c2.jsonl"), progress=False
        )
    )
    assert healthy["warnings"] == []  # 80% readable


def test_no_readable_verdict_at_all_exits_2_with_the_format_and_the_first_answers(tmp_path, capsys):
    data = _pairs(tmp_path / "pairs.jsonl", readable=4, unreadable=0)
    with pytest.raises(UnreadableJudgeError, match="not one of the 8 verdicts"):
        run_judge_check(JudgeCheckJob(judge=ALWAYS_NAN, data=data, cache=str(tmp_path / "c.jsonl"), progress=False))
    assert (
        main(["judge-check", "--judge", ALWAYS_NAN, "--data", data, "--cache", str(tmp_path / "c.jsonl"), "--no-progress"]) == 2
    )
    captured = capsys.readouterr()
    assert captured.out == ""  # no table of dashes
    assert "must be a number" in captured.err and "1. 'reward A=nan B=nan'" in captured.err


def test_progress_goes_to_stderr_as_plain_lines_when_it_is_not_a_terminal(tmp_path, capsys):
    pairs = 2 * JUDGE_CHECK_CHUNK + 8
    data = _pairs(tmp_path / "pairs.jsonl", readable=pairs, unreadable=0)
    assert main(["judge-check", "--judge", NAN_WHEN_SHORT, "--data", data, "--cache", str(tmp_path / "c.jsonl")]) == 0
    err = capsys.readouterr().err
    progress = [line for line in err.splitlines() if line.startswith("judge-check: ")]
    assert [line.split(",")[0] for line in progress] == [
        f"judge-check: {JUDGE_CHECK_CHUNK}/{pairs} ({100 * JUDGE_CHECK_CHUNK // pairs}%)",
        f"judge-check: {2 * JUDGE_CHECK_CHUNK}/{pairs} ({100 * 2 * JUDGE_CHECK_CHUNK // pairs}%)",
        f"judge-check: {pairs}/{pairs} (100%)",
    ]
    assert "\r" not in err and "template=-" in progress[-1]
