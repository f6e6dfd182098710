"""``dpokit label``: the pairs it reads, the label file it appends to and resumes from, its local server
(real HTTP on 127.0.0.1), the page in a real headless Chromium, and the judge-check report on the labels."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dpokit.analysis.label import LabelFile, LabelJob, is_label_file, make_label_server, read_label_pairs, read_labels
from dpokit.analysis.label.check import human_check_markdown, human_judge_check
from dpokit.analysis.label.pairs import LabelPair
from dpokit.analysis.label.server import MAX_BODY_BYTES, server_lines
from dpokit.analysis.label.store import left_side
from dpokit.analysis.winrate import JudgeCheckJob, WinrateJob, run_winrate
from dpokit.commands.main import main
from dpokit.errors import ConfigError, DataError
from dpokit.judges.agreement import human_agreement
from tests.helpers import tiny_llama, tiny_tokenizer

LENGTH = "reward:tests.judges.fakes:length_reward"  # the longer response wins
XSS = '<img src=x onerror="window.__xss = 1"><script>window.__xss = 2</script>'
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = (
    "the browser test needs Chromium and Playwright for Python: `apt-get install -y chromium` (as root; `make test` "
    "does it) and `pip install -e '.[test]'` (never `playwright install`); or set DPOKIT_CHROMIUM to a Chromium binary"
)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _pairs_file(path: Path, n: int = 5) -> str:
    """n pairs whose a is longer than b (the length judge prefers a); the first prompt tries to inject HTML."""
    rows = [{"prompt": XSS if i == 0 else f"prompt {i}", "response_a": f"a long answer number {i}", "response_b": f"short {i}"}
            for i in range(n)]  # fmt: skip
    return _write_jsonl(path, rows)


# ------------------------------------------------------------------------------------------ inputs


def test_each_input_shape_becomes_a_pair_of_a_and_b(tmp_path):
    messages = [{"role": "user", "content": "hi"}]
    path = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "p", "response_a": "x", "response_b": "y"},
            {"prompt": "p", "chosen": "good", "rejected": "bad"},
            {"prompt": messages, "responses": ["best", "middle", "worst"], "scores": [3, 2, 1]},
        ],
    )
    plain, pair, ranked = read_label_pairs(path)
    assert (plain.a, plain.b, plain.a_field, plain.b_field) == ("x", "y", "response_a", "response_b")
    assert (pair.a, pair.b, pair.a_field) == ("good", "bad", "chosen")
    assert (ranked.a, ranked.b, ranked.b_field, ranked.prompt) == ("best", "worst", "responses[2]", messages)
    assert pair.source.endswith("mixed.jsonl:line 2") and plain.id != pair.id
    assert LabelPair("p", "x", "y", "elsewhere", "a", "b").id == plain.id  # the id is the content, not the place


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"chosen": "x", "rejected": "y"}, "line 1: missing field 'prompt'"),
        ({"prompt": "p", "chosen": "x"}, "line 1: a pair needs both 'chosen' and 'rejected'"),
        ({"prompt": "p", "response_a": "x", "response_b": 3}, "line 1: field 'response_b'"),
        ({"prompt": "p", "responses": ["only one"]}, "at least two responses"),
        ({"prompt": "p", "response": "x"}, "no pair of completions"),
    ],
)
def test_a_row_that_is_not_a_pair_is_refused_naming_its_line_and_field(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        read_label_pairs(_write_jsonl(tmp_path / "bad.jsonl", [row]))


def test_a_winrate_output_directory_pairs_each_model_sample_with_the_baseline_sample_it_was_judged_against(tmp_path):
    model = tmp_path / "model"
    tiny_llama(seed=0).save_pretrained(model)
    tiny_tokenizer(chat_template=None).save_pretrained(model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the movie\na plot\n")
    out = tmp_path / "winrate"
    job = WinrateJob(
        models=[("dpo", str(model))], baseline=str(model), prompts=str(prompts), judge=LENGTH, temperatures=[1.0],
        samples_per_prompt=2, max_new_tokens=4, out=str(out), bootstrap_samples=50, progress=False,
    )  # fmt: skip
    run_winrate(job)
    pairs = read_label_pairs(out)
    [mine] = (out / "samples" / "dpo").glob("t1-*.json")
    [theirs] = (out / "samples" / "baseline").glob("t1-*.json")
    model_samples = json.loads(mine.read_text())["completions"]
    baseline_samples = json.loads(theirs.read_text())["completions"]
    assert [(p.prompt, p.a, p.b) for p in pairs] == [
        (prompt, model_samples[i][j], baseline_samples[i][j]) for i, prompt in enumerate(["the movie", "a plot"]) for j in (0, 1)
    ]
    assert pairs[0].a_field == "dpo@T=1" and pairs[0].b_field == "baseline@T=1"
    with pytest.raises(DataError, match="not a dpokit winrate output"):
        read_label_pairs(tmp_path / "model")
    for stored in (out / "samples" / "baseline").glob("*.json"):
        stored.unlink()
    with pytest.raises(DataError, match="samples/baseline: no stored samples at temperature 1"):
        read_label_pairs(out)


# -------------------------------------------------------------------------------------- label file


def test_the_left_side_is_drawn_from_the_seed_and_the_pair(tmp_path):
    ids = [f"pair-{i}" for i in range(64)]
    sides = [left_side(i, seed=0) for i in ids]
    assert sides == [left_side(i, seed=0) for i in ids]  # a reload shows the same order
    assert 16 < sides.count("a") < 48  # both orders occur
    assert sides != [left_side(i, seed=1) for i in ids]


def test_labels_are_whole_lines_that_resume_and_a_torn_line_is_passed_over_and_asked_again(tmp_path):
    pairs = read_label_pairs(_pairs_file(tmp_path / "pairs.jsonl", 3))
    path = tmp_path / "labels.jsonl"
    first = LabelFile(path, seed=0)
    assert first.record(0, pairs[0], "a") and not first.record(0, pairs[0], "b")  # a second click writes nothing
    path.write_bytes(path.read_bytes() + b'{"id": "' + pairs[1].id.encode() + b'", "prom')  # a crash mid-line
    resumed = LabelFile(path, seed=0)
    assert resumed.done == {pairs[0].id: "a"}
    [warning] = resumed.warnings
    assert f"{path}:2: a line cut short" in warning
    assert resumed.record(1, pairs[1], "tie") and resumed.record(2, pairs[2], "skip")
    labels, warnings = read_labels(path)
    assert [(x.id, x.choice) for x in labels] == [(pairs[0].id, "a"), (pairs[1].id, "tie"), (pairs[2].id, "skip")]
    assert len(warnings) == 1 and path.read_bytes().endswith(b"\n")
    row = json.loads(path.read_text().splitlines()[0])
    assert row["left"] == left_side(pairs[0].id, 0) and row["seed"] == 0 and row["prompt"] == XSS
    assert is_label_file(path) and not is_label_file(tmp_path / "pairs.jsonl")


GOOD_LABEL = {"id": "x", "prompt": "p", "a": "1", "b": "2", "left": "a", "choice": "a"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"choice": "maybe"}, "field 'choice' is 'maybe'"),
        ({"left": "middle"}, "field 'left' is 'middle'"),
        ({"a": 7}, "field 'a' must be text"),
        ({"id": None, "prompt": None}, "field 'id' must be text"),
    ],
)
def test_a_label_line_with_a_bad_field_is_refused_naming_file_line_and_field(tmp_path, change, message):
    path = _write_jsonl(tmp_path / "labels.jsonl", [GOOD_LABEL, {**GOOD_LABEL, "id": "y", **change}])
    with pytest.raises(DataError, match=f"labels.jsonl:2: {message}"):
        read_labels(path)
    (tmp_path / "other.jsonl").write_text('{"id": "x", "prompt": "p"}\n[1]\n')
    with pytest.raises(DataError, match="other.jsonl:1: missing field 'a'"):
        read_labels(tmp_path / "other.jsonl")


def test_a_pair_labelled_twice_keeps_its_first_label_with_a_warning(tmp_path):
    path = _write_jsonl(tmp_path / "labels.jsonl", [GOOD_LABEL, {**GOOD_LABEL, "choice": "b"}])
    labels, [warning] = read_labels(path)
    assert [x.choice for x in labels] == ["a"] and "1 pair(s) labelled more than once" in warning


# ------------------------------------------------------------------------------------------ server


@pytest.fixture
def server(tmp_path):
    """A label server on a free port of 127.0.0.1, serving five pairs into tmp_path/labels.jsonl."""
    job = LabelJob(data=_pairs_file(tmp_path / "pairs.jsonl"), out=str(tmp_path / "labels.jsonl"), port=0, seed=3)
    httpd = make_label_server(job)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _request(httpd, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", httpd.server_address[1], timeout=10)
    connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, response.headers, data


def _label(httpd, pair_id, choice):
    status, _, data = _request(httpd, "POST", "/api/label", json.dumps({"id": pair_id, "choice": choice}))
    assert status == 200, data
    return json.loads(data)


def test_the_server_shows_pairs_in_order_records_sides_as_a_or_b_and_ignores_a_repeated_click(server, tmp_path):
    state = json.loads(_request(server, "GET", "/api/next")[2])
    assert (state["labelled"], state["total"], state["pair"]["index"]) == (0, 5, 0)
    first = state["pair"]
    assert first["prompt"] == XSS  # JSON carries the text as it is; the page sets it with textContent
    after = _label(server, first["id"], "left")
    assert after["recorded"] and after["pair"]["index"] == 1 and after["labelled"] == 1
    assert not _label(server, first["id"], "right")["recorded"]
    after = _label(server, after["pair"]["id"], "right")
    labels, _ = read_labels(tmp_path / "labels.jsonl")
    left0, left1 = (left_side(x.id, 3) for x in labels)
    assert [x.choice for x in labels] == [left0, "b" if left1 == "a" else "a"]
    shown_left = first["left"]
    assert shown_left == (labels[0].a if left0 == "a" else labels[0].b)
    while after["pair"] is not None:
        after = _label(server, after["pair"]["id"], "skip")
    assert (after["labelled"], after["total"]) == (5, 5) and len(read_labels(tmp_path / "labels.jsonl")[0]) == 5


def test_the_page_is_served_with_its_own_script_only_and_no_inline_code(server):
    status, headers, page = _request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    assert b"<script>" not in page and b"onclick" not in page
    status, _, script = _request(server, "GET", "/label.js")
    assert status == 200 and b"innerHTML" not in script and b"textContent" in script
    assert _request(server, "GET", "/../pyproject.toml")[0] == 404


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        ({"Content-Length": str(MAX_BODY_BYTES + 1)}, b"", 413, "at most"),
        ({"Content-Type": "text/plain"}, b'{"id": "x", "choice": "left"}', 415, "application/json"),
        ({}, b"{not json", 400, "not JSON"),
        ({}, b'{"id": "nope", "choice": "left"}', 400, "no pair with id"),
        ({}, b'["left"]', 400, "expected a JSON object"),
        ({"Host": "attacker.example:80"}, b"{}", 403, "is not this machine"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_written(server, tmp_path, headers, body, status, message):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    connection.putrequest("POST", "/api/label", skip_host="Host" in headers)
    for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
        connection.putheader(name, value)
    connection.endheaders()
    if status != 413:  # a 413 is answered from the headers, before the announced body is read
        connection.send(body)
    response = connection.getresponse()
    assert response.status == status and message in json.loads(response.read())["error"]
    connection.close()
    assert not (tmp_path / "labels.jsonl").exists()


def test_a_missing_content_length_is_refused(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    connection.putrequest("POST", "/api/label")
    connection.putheader("Content-Type", "application/json")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411
    connection.close()


def test_unknown_routes_and_malformed_lengths_get_json_errors_and_chat_prompts_are_shown_as_text(server, tmp_path):
    assert _request(server, "GET", "/nothing")[0] == 404
    assert _request(server, "POST", "/api/other", "{}")[0] == 404
    status, headers, body = _request(server, "HEAD", "/label.css")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    status, _, body = _request(server, "POST", "/api/label", "{}", headers={"Content-Length": "-1"})
    assert status == 400 and b"one whole number" in body
    messages = [{"role": "system", "content": "be <b>brief</b>"}, {"role": "user", "content": "hi"}]
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"prompt": messages, "chosen": "x", "rejected": "y"}])
    session = make_label_server(LabelJob(data=data, out=str(tmp_path / "chat-labels.jsonl"), port=0))
    try:
        assert session.session.state()["pair"]["prompt"] == "system:\nbe <b>brief</b>\n\nuser:\nhi"
    finally:
        session.server_close()


def test_the_command_reports_a_missing_input_or_a_bad_row_as_one_error_line(tmp_path, capsys):
    assert main(["label", "--data", str(tmp_path / "missing.jsonl"), "--port", "0"]) == 2
    assert "missing.jsonl: input file not found" in capsys.readouterr().err
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "x"}])
    assert main(["label", "--data", bad, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl:line 1: a pair needs both 'chosen' and 'rejected'" in err
    assert "Traceback" not in err


def test_label_jobs_are_validated(tmp_path):
    data = _pairs_file(tmp_path / "pairs.jsonl")
    with pytest.raises(ConfigError, match="is the input file"):
        LabelJob(data=data, out=data).validate()
    with pytest.raises(ConfigError, match="port"):
        LabelJob(data=data, port=70000).validate()


def test_the_server_says_it_binds_127_0_0_1_by_default(server, tmp_path):
    job = LabelJob(data=str(tmp_path / "pairs.jsonl"), out=str(tmp_path / "labels.jsonl"), port=0)
    lines = server_lines(server, job)
    assert lines[0] == f"labelling at http://127.0.0.1:{server.server_address[1]}/" and "5 pairs from" in lines[1]
    assert lines[-1].startswith("bound to 127.0.0.1: only this machine can open the page")


def test_the_command_bound_to_every_address_warns_that_anyone_who_reaches_the_machine_can_label(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    data = _pairs_file(tmp_path / "pairs.jsonl")
    command = [sys.executable, "-m", "dpokit", "label", "--data", data, "--port", "0", "--host", "0.0.0.0"]
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [process.stderr.readline() for _ in range(4)]
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert lines[0].startswith("labelling at http://0.0.0.0:")
    assert lines[3].startswith("warning: bound to 0.0.0.0: anyone who can reach this machine can read the prompts")


# ------------------------------------------------------------------------------ the judge on the labels


def test_judge_check_on_labels_reports_agreement_and_kappa_with_ties_and_skips_left_out(tmp_path):
    pairs = read_label_pairs(_pairs_file(tmp_path / "pairs.jsonl", 6))
    path = tmp_path / "labels.jsonl"
    labels = LabelFile(path, seed=0)
    for index, choice in enumerate(["a", "a", "b", "tie", "skip", "a"]):
        labels.record(index, pairs[index], choice)
    job = JudgeCheckJob(judge=LENGTH, data=str(path), cache=str(tmp_path / "cache.jsonl"), progress=False)
    report = human_judge_check(job)
    [row] = report["results"]
    # The length judge prefers a on every pair; the person chose a, a, b on the decided ones (a tie, a skip left out).
    expected = human_agreement(["a", "a", "b", "tie", "skip", "a"], ["a"] * 6).to_dict()
    assert row["n"] == 4 and row["agreement"] == pytest.approx(3 / 4)
    assert row["human_ties"] == 1 and row["human_skips"] == 1 and row["judge_unparseable"] == 0
    assert {k: row[k] for k in expected} == expected and row["position_bias"] == 0.0
    table = human_check_markdown(report)
    assert "| - | 4 | 0.750 [" in table and "left out: 1 ties, 1 skips" in table and "bootstrap" in table
    with pytest.raises(DataError, match="no labels yet"):
        human_judge_check(JudgeCheckJob(judge=LENGTH, data=str(tmp_path / "none.jsonl"), progress=False))


def test_the_judge_check_command_on_a_label_file_prints_the_human_agreement_table(tmp_path, capsys):
    pairs = read_label_pairs(_pairs_file(tmp_path / "pairs.jsonl", 4))
    path = tmp_path / "labels.jsonl"
    labels = LabelFile(path, seed=0)
    for index, choice in enumerate(["a", "b", "a", "skip"]):
        labels.record(index, pairs[index], choice)
    common = ["judge-check", "--judge", LENGTH, "--data", str(path), "--cache", str(tmp_path / "c.jsonl"), "--no-progress"]
    assert main(common) == 0
    table = capsys.readouterr().out
    assert "against 4 human labels" in table and "| - | 3 | 0.667 [" in table and "Cohen's κ" in table
    assert main([*common, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["results"]
    assert (row["n"], row["human_skips"]) == (3, 1) and row["agreement"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------- in a browser


def chromium_path() -> str:
    """The Chromium to drive: $DPOKIT_CHROMIUM, else the system's; fails (never skips) with the install hint."""
    found = os.environ.get("DPOKIT_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if not found:
        pytest.fail(f"no Chromium found: {INSTALL_HINT}")
    return found


def test_the_page_in_a_browser_labels_three_pairs_by_keys_and_clicks_and_a_reload_resumes_at_the_fourth(server, tmp_path):
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed: {INSTALL_HINT}")
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        shown = page.locator("#pair")

        def wait_for_index(index: int) -> None:  # the page's CSP forbids eval: wait on a selector
            page.wait_for_selector(f'#pair[data-index="{index}"]', timeout=5000)

        wait_for_index(0)
        assert page.locator("#prompt").text_content() == XSS  # shown as text, not run
        assert page.evaluate("window.__xss") is None and page.locator("#prompt img").count() == 0
        page.keyboard.press("1")
        wait_for_index(1)
        page.click("#choose-right")
        wait_for_index(2)
        page.keyboard.press("t")
        wait_for_index(3)
        page.reload()
        wait_for_index(3)
        assert shown.is_visible() and page.locator("#progress").text_content().startswith("3 of 5 labelled")
        assert errors == []
        browser.close()
    labels, warnings = read_labels(tmp_path / "labels.jsonl")
    assert warnings == [] and len(labels) == 3
    sides = [left_side(x.id, 3) for x in labels]
    assert [x.choice for x in labels] == [sides[0], "b" if sides[1] == "a" else "a", "tie"]
    job = JudgeCheckJob(judge=LENGTH, data=str(tmp_path / "labels.jsonl"), cache=str(tmp_path / "c.jsonl"), progress=False)
    [row] = human_judge_check(job)["results"]
    assert row["labelled"] == 3 and row["human_ties"] == 1 and row["n"] == 2
    assert row["agreement"] == pytest.approx([x.choice for x in labels[:2]].count("a") / 2)  # the judge picks a, the longer
