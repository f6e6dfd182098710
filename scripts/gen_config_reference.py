"""Print the configuration reference (every key, its type, default and meaning) as Markdown.

The README's "Configuration reference" section is this script's output:

    python scripts/gen_config_reference.py > /tmp/config_reference.md
"""

from dpokit.config import config_reference_markdown

if __name__ == "__main__":
    print(config_reference_markdown(), end="")
