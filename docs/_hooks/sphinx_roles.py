"""MkDocs hook: the code's docstrings cross-reference in Sphinx's style (``:class:`~dpokit.data.Batch```),
which mkdocstrings renders as the role's name before the code. This drops the role name and, for a
``~`` target, the module path, so the API pages read ``Batch`` as Sphinx would."""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|const):<code>(~?)([\w.]+)</code>")


def _shown(match: re.Match[str]) -> str:
    tilde, target = match.group(1), match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    """The page's HTML with Sphinx role names removed from cross-references."""
    return ROLE.sub(_shown, html)
