"""The README's promises that code can check: the two commands at the top, the generated config
reference (so it cannot drift from the typed config), and the example configs it names."""

from pathlib import Path

from dpokit.config import config_reference_markdown, load_config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_commands():
    top = README[:600]
    assert "make demo" in top and "make test" in top


def test_readme_config_reference_is_the_generated_one_verbatim():
    # Regenerate with: python scripts/gen_config_reference.py
    assert config_reference_markdown().strip() in README


def test_every_example_config_named_in_the_readme_loads():
    named = sorted(
        {
            word.strip("`,.()")
            for word in README.split()
            if word.strip("`,.()").startswith("examples/") and word.strip("`,.()").endswith(".yaml")
        }
    )
    assert named, "the README names the example configs"
    for name in named:
        load_config(REPO / name)
