"""Local path or hub id: one rule for data files, models, tokenizers and reference models.

A name that exists on disk is local. A name that does not exist is *taken for a local path*, and
refused at once with "no such file or directory", when it

* starts with ``.``, ``/`` or ``~``;
* holds a backslash, or more than the one slash of a hub id ``org/name``;
* ends in a file suffix (``suffixes``: ``.jsonl``, ``.json``, ``.csv``, ... for data);
* is ``dir/name`` where ``dir`` is an existing local directory (``data/train`` when ``data/`` exists).

Any other name (``name`` or ``org/name``) is a hub id, tried through the hub library (from its local
cache when ``HF_HUB_OFFLINE`` is set). When that fails because the hub cannot be reached, the error
says "no such file or directory, and the hub is not reachable" (:func:`missing_message`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_OFFLINE_MARKERS = (
    "offline",
    "couldn't connect",
    "could not connect",
    "couldn't reach",
    "connection",
    "name resolution",
    "timed out",
    "max retries",
)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (the hub is not tried; only its cache)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_local(name: str, suffixes: Iterable[str] = ()) -> bool:
    """Whether ``name`` (which need not exist) is meant as a local path rather than a hub id (module docstring)."""
    text = str(name)
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in text:
        return True
    if text.lower().endswith(tuple(suffixes)):
        return True
    head, slash, _ = text.partition("/")
    return bool(slash) and Path(head).expanduser().is_dir()


def is_unreachable_hub_error(error: BaseException) -> bool:
    """Whether a hub library's error says the hub could not be reached (offline mode, no network)."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(error).__name__}: {error}".lower()
    return any(marker in text for marker in _OFFLINE_MARKERS)


def missing_message(name: str | Path, what: str = "", error: BaseException | None = None) -> str:
    """``"<name>: no such file or directory, and the hub is not reachable ..."`` for a hub-style name
    that is neither on disk nor obtainable from the hub (``error``: the hub library's error)."""
    offline = hub_offline() or "offline" in type(error).__name__.lower()  # not the text: it mentions offline mode anyway
    why = "offline mode (HF_HUB_OFFLINE), and it is not in the local hub cache" if offline else "no network connection"
    thing = f" ({what})" if what else ""
    return (
        f"{name}: no such file or directory{thing}, and the hub is not reachable ({why}); "
        "check the path, or download it and pass the local directory"
    )


def missing_local(name: str | Path, suffixes: Iterable[str] = ()) -> bool:
    """True when ``name`` does not exist and :func:`looks_local`: the caller says "no such file or
    directory" at once; a hub-style name is the hub library's to find."""
    text = str(name)
    return not Path(text).expanduser().exists() and looks_local(text, suffixes)
