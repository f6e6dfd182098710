"""The documentation's promises that code can check.

README.md and the site under docs/ (built by MkDocs from mkdocs.yml) show configs and command lines a
user will copy, so every one of them is run through dpokit's own loaders here:

* the README opens with the two commands (`make demo`, `make test`);
* the site builds with `mkdocs build --strict`: a broken link or anchor, a page left out of the
  navigation or an API page mkdocstrings cannot render fails;
* the configuration reference page is exactly what scripts/gen_config_reference.py writes;
* every ```yaml block is a config that loads (a block whose first line is `# fragment` is a part of one
  and loads on its own; a whole config names its model, and what its command needs);
* every `dpokit ...` line in a ```bash / ```sh / ```console block parses with dpokit's argument parser,
  and the overrides of `train`, `sft` and `online` lines load into a config;
* every example config the docs name loads; every relative link in the README points into the repository.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dpokit.commands.main import SUBCOMMANDS, build_parser
from dpokit.config import DataConfig, TrainConfig, config_from_dict, load_config, require_paths
from dpokit.data.formats import check_columns
from dpokit.errors import DpokitError

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC_FILES = [README, *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMAND_NAMES = {command.name for command in SUBCOMMANDS}
FRAGMENT_MARK = "# fragment"


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it starts (file, line of its first content line), its language and text."""

    path: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, indentation (a block inside a list item) removed."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = len(match["indent"]), match["fence"], match["lang"].lower()
        start, i = i + 1, i + 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        body = [line[indent:] if line[:indent].isspace() else line for line in lines[start:i]]
        blocks.append(Block(path, start + 1, lang, "\n".join(body)))
        i += 1
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in fenced_blocks(path)]
YAML_BLOCKS = [block for block in ALL_BLOCKS if block.lang in ("yaml", "yml")]


@dataclass(frozen=True)
class CommandLine:
    """One `dpokit ...` invocation in a shell block: where it is and its arguments after `dpokit`."""

    where: str
    text: str
    argv: tuple[str, ...]


def _logical_lines(block: Block) -> list[tuple[int, str]]:
    """The block's lines with backslash continuations joined, each with its first line's number."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for offset, raw in enumerate(block.text.splitlines()):
        line = raw.rstrip()
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line.rstrip("\\").strip())
        else:
            pending = (block.line + offset, line.rstrip("\\"))
        if not line.endswith("\\"):
            joined.append(pending)
            pending = None
    if pending is not None:
        joined.append(pending)
    return joined


def _dpokit_argv(line: str) -> list[str] | None:
    """The arguments after `dpokit` (or `-m dpokit`) in one shell line, up to a pipe, `&&`, `;`, `&` or a
    redirection; None when the line does not run dpokit."""
    text = line.strip().removeprefix("$ ")
    tokens = shlex.split(text, comments=True)
    if tokens[:1] == ["dpokit"]:
        rest = tokens[1:]
    elif any(tokens[i : i + 2] == ["-m", "dpokit"] for i in range(len(tokens))):
        at = next(i for i in range(len(tokens)) if tokens[i : i + 2] == ["-m", "dpokit"])
        rest = tokens[at + 2 :]
    else:
        return None
    for stop, token in enumerate(rest):
        if token in ("|", "||", "&&", ";", "&") or token.startswith((">", "<", "2>")):
            return rest[:stop]
    return rest


def command_lines() -> list[CommandLine]:
    """Every `dpokit ...` line of the shell blocks in the README and the site."""
    found = []
    for block in ALL_BLOCKS:
        if block.lang not in SHELL_LANGS:
            continue
        for number, line in _logical_lines(block):
            argv = _dpokit_argv(line)
            if argv:
                found.append(CommandLine(f"{block.path.relative_to(REPO)}:{number}", line.strip(), tuple(argv)))
    return found


COMMAND_LINES = command_lines()


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def check_whole_config(cfg: TrainConfig) -> None:
    """What the command that reads a whole config checks before it loads anything: `dpokit online` for a
    config with `online.prompts_path`, `dpokit train` otherwise (a model and training data)."""
    if cfg.online.prompts_path:
        from dpokit.online import online_config

        online_config(cfg)
    else:
        require_paths(cfg)
    check_columns(cfg.data.columns)


# ------------------------------------------------------------------------------------------------


def test_readme_opens_with_the_two_commands():
    top = README.read_text(encoding="utf-8")[:600]
    assert "make demo" in top and "make test" in top


def test_site_builds_in_strict_mode_with_the_api_pages_rendered(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    config = str(REPO / "mkdocs.yml")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", config, "--site-dir", str(site)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        "mkdocs build --strict failed (install the docs tools with pip install -e '.[docs]'):\n" + done.stdout + done.stderr
    )
    assert (site / "reference" / "config" / "index.html").is_file()
    api_page = (site / "api" / "data" / "index.html").read_text(encoding="utf-8")
    assert "prepare_dataset" in api_page, "mkdocstrings rendered no API documentation for dpokit.data"


def test_config_reference_page_is_the_generated_one():
    spec = importlib.util.spec_from_file_location("gen_config_reference", REPO / "scripts" / "gen_config_reference.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    page = REPO / "docs" / "reference" / "config.md"
    assert page.read_text(encoding="utf-8") == generator.render(), "stale: run python scripts/gen_config_reference.py"


def test_docs_hold_yaml_configs_and_dpokit_command_lines_to_check():
    # The checks below are parametrized over what the parser finds; an empty find would check nothing.
    assert any(block.path == README for block in YAML_BLOCKS)
    assert any(block.text.startswith(FRAGMENT_MARK) for block in YAML_BLOCKS)
    assert {line.argv[0] for line in COMMAND_LINES} >= {"train", "sft", "online", "winrate", "judge-check", "experiment"}
    assert any(line.where.startswith("README.md") for line in COMMAND_LINES)


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=[block.where for block in YAML_BLOCKS])
def test_yaml_snippet_in_the_docs_is_a_config_that_loads(block, tmp_path):
    fragment = block.text.lstrip().startswith(FRAGMENT_MARK)
    try:
        if fragment:
            loaded = yaml.safe_load(block.text) or {}
            minimal = {"model": {"name_or_path": "path/to/model"}, "data": {"train_path": "prefs.jsonl"}}
            cfg = config_from_dict(_merged(minimal, loaded))
            check_columns(cfg.data.columns)
        else:
            path = tmp_path / "snippet.yaml"
            path.write_text(block.text, encoding="utf-8")
            check_whole_config(load_config(path))
    except DpokitError as error:
        kind = "fragment" if fragment else f"config (mark a part of one with '{FRAGMENT_MARK}' on its first line)"
        pytest.fail(f"{block.where}: the yaml {kind} does not load: {error}")


@pytest.mark.parametrize("line", COMMAND_LINES, ids=[line.where for line in COMMAND_LINES])
def test_dpokit_command_line_in_the_docs_parses(line):
    command = line.argv[0]
    assert command in COMMAND_NAMES, f"{line.where}: 'dpokit {command}' is not a dpokit command: {line.text}"
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = build_parser(only=command).parse_args(list(line.argv))
    except SystemExit:
        message = (errors.getvalue().strip().splitlines() or ["(no message)"])[-1]
        pytest.fail(f"{line.where}: dpokit's parser refuses {line.text!r}: {message}")
    if command in ("train", "sft", "online"):
        config = REPO / args.config
        try:
            load_config(config if config.is_file() else None, list(args.overrides), preset="sft" if command == "sft" else None)
        except DpokitError as error:
            pytest.fail(f"{line.where}: the overrides of {line.text!r} do not load: {error}")


def test_every_example_config_named_in_the_docs_loads():
    named = sorted({m for path in DOC_FILES for m in re.findall(r"examples/[\w.-]+\.yaml", path.read_text(encoding="utf-8"))})
    assert "examples/full.yaml" in named and "examples/online.yaml" in named
    for name in named:
        assert (REPO / name).is_file(), f"the docs name {name}, which does not exist"
        try:
            check_whole_config(load_config(REPO / name))
        except DpokitError as error:
            pytest.fail(f"{name} (named in the docs) does not load: {error}")


def test_data_columns_examples_map_source_columns_to_fields():
    # data.columns is {source column: field}; the config reference's example must be one the reader accepts.
    help_text = next(f.metadata["help"] for f in DataConfig.__dataclass_fields__.values() if f.name == "columns")
    example = re.search(r"\{[^{}]*\}", help_text.split("e.g.", 1)[1])
    assert example, f"no example mapping in the help of data.columns: {help_text}"
    mapping = yaml.safe_load(example.group(0))
    assert set(check_columns(mapping)) <= {"prompt", "chosen", "rejected"}
    with pytest.raises(DpokitError, match="unknown field"):
        check_columns({field: column for column, field in mapping.items()})


def test_readme_links_point_to_files_in_the_repository():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert targets, "the README links into the docs"
    missing = [t for t in targets if not (REPO / t.split("#", 1)[0]).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_lists_and_tables_in_the_docs_start_after_a_blank_line():
    # GitHub starts a list or a table right under a paragraph line; MkDocs (Python-Markdown) reads it as
    # more of the paragraph, so the site would show "- item" and "| a | b |" as text.
    glued = []
    for path in DOC_FILES:
        in_code = False
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, (previous, line) in enumerate(zip(["", *lines][: len(lines)], lines, strict=True), start=1):
            if FENCE.match(line):
                in_code = not in_code
            starts_block = re.match(r"(- |\* |\d+\. |\|)", line)
            in_block = not previous.strip() or re.match(r"\s*(- |\* |\d+\. |\||#)", previous) or previous.startswith(" ")
            if not in_code and starts_block and not in_block:
                glued.append(f"{path.relative_to(REPO)}:{number}: {line[:60]}")
    assert not glued, "add a blank line before these lists/tables:\n" + "\n".join(glued)
