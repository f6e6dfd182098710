"""Every judgment on disk, so a rerun or a resumed evaluation costs nothing and gives the same numbers.

The cache is one JSONL file; a line is
``{"key": ..., "kind": "pair"|"score", "a": ..., "value": ..., "check": ...}``, where
``key = sha256(judge identity, template text, kind, prompt, response A[, response B][, image digests])`` --
the order of A and B is part of the key, so the two orders of a pair are two entries; a prompt with images
adds the sha256 of each image file (the same question on another image is another judgment). ``a`` is a digest of response
A (the one ``prob_a`` is about; for a score, the scored response), checked when the row is used, and
``check`` a digest of the whole row, so a value moved onto another row (say, the two orders' ``prob_a``
swapped) is not taken for that row's judgment.

Reading checks every line: one that is not UTF-8, not JSON, fails its ``check``, or holds a value of the
wrong type or range (``prob_a`` outside [0, 1], a score that is not a number) is dropped with one warning
that counts them and names ``file:line``; the judge is asked again for it. Lines are appended and flushed
one at a time under a lock (several threads of one judge may answer at once); an append after a torn last
line (a crash mid-write) starts on a new line, so it never joins the torn one. Unparseable judgments are
cached too: a rerun reproduces them instead of asking again.

:class:`CachedJudge` wraps any judge: it answers what the file knows and asks the judge only for the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpokit.judges.base import Images, Judge, PairJudgment, Text, check_lengths

DEFAULT_CACHE = ".dpokit_cache/judgments/judgments.jsonl"
KINDS = ("pair", "score")

logger = logging.getLogger(__name__)


def judgment_key(identity: str, template: str, kind: str, *texts: Text | list[str]) -> str:
    payload = json.dumps([identity, template, kind, *texts], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def images_digest(images: Sequence[bytes]) -> list[str]:
    """The sha256 of each of a prompt's image files: what a judgment's key adds for them (nothing without images)."""
    return [hashlib.sha256(image).hexdigest() for image in images]


def text_digest(text: Text) -> str:
    """A short digest of a response (the ``a`` field of a row: which response the value is about)."""
    return hashlib.sha256(json.dumps(text, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def row_check(key: str, kind: str, first: str, value: Any) -> str:
    """The digest binding a row's value to its key, kind and response A."""
    payload = json.dumps([key, kind, first, value], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def value_problem(kind: str, value: Any) -> str | None:
    """Why ``value`` is no cached judgment of ``kind`` (None when it is one)."""
    if kind == "score":
        if value == "nan" or (isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)):
            return None
        return f"score {value!r} is not a number"
    if not isinstance(value, dict) or set(value) != {"prob_a", "raw", "parsed"}:
        return f"pair judgment {value!r} is not {{prob_a, raw, parsed}}"
    prob, parsed = value["prob_a"], value["parsed"]
    if not isinstance(parsed, bool) or not isinstance(value["raw"], str):
        return "'parsed' must be true/false and 'raw' a string"
    if prob is None:
        return None if not parsed else "prob_a is null in a parsed judgment"
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
        return f"prob_a {prob!r} is not a probability in [0, 1]"
    return None


def row_problem(line: bytes) -> tuple[str, Any, str] | str:
    """``(key, value, a)`` of one line of the file, or why the line is unusable."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "not valid UTF-8"
    except (json.JSONDecodeError, RecursionError):
        return "not a JSON object (cut short?)"
    if isinstance(row, dict) and "value" in row and "check" not in row and "a" not in row:
        return "written by an older dpokit, without the response-A digest and row check"
    if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in ("key", "kind", "a", "check")):
        return "not a cache row {key, kind, a, value, check}"
    if row["kind"] not in KINDS:
        return f"kind {row['kind']!r} is not one of {KINDS}"
    problem = value_problem(row["kind"], row.get("value"))
    if problem is not None:
        return problem
    if row["check"] != row_check(row["key"], row["kind"], row["a"], row["value"]):
        return "its value does not match its key (edited, or moved from another row)"
    return row["key"], row["value"], row["a"]


class JudgmentCache:
    """An append-only JSONL file of judgments, loaded (and checked) into memory when opened.

    ``dropped``: ``"file:line: why"`` for each line that was unusable when the file was read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Any, str]] = {}
        self.dropped: list[str] = []
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as error:
            logger.warning("%s: cannot read the judgment cache (%s); every judgment will be asked again", self.path, error)
            return
        for number, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            parsed = row_problem(line)
            if isinstance(parsed, str):
                self.dropped.append(f"{self.path}:{number}: {parsed}")
                continue
            key, value, first = parsed
            self._entries[key] = (value, first)
        if self.dropped:
            shown = "; ".join(self.dropped[:3]) + ("; ..." if len(self.dropped) > 3 else "")
            logger.warning("dropped %d unusable cached judgment(s) (%s); they will be asked again", len(self.dropped), shown)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, first: str) -> Any:
        """The value stored under ``key`` for response A of digest ``first`` (:func:`text_digest`), else None."""
        entry = self._entries.get(key)
        return entry[0] if entry is not None and entry[1] == first else None

    def put_many(self, items: Sequence[tuple[str, str, str, Any]]) -> None:
        """Store ``(key, kind, digest of response A, value)`` entries: appended, flushed and fsynced together,
        on a new line even when the file ends with a torn one."""
        if not items:
            return
        lines = []
        for key, kind, first, value in items:
            self._entries[key] = (value, first)
            row = {"key": key, "kind": kind, "a": first, "value": value, "check": row_check(key, kind, first, value)}
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as handle:
                if handle.tell() > 0 and not _ends_with_newline(self.path):
                    handle.write(b"\n")  # close the torn line: it stays unreadable alone, the new rows stay whole
                handle.write("".join(lines).encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


class CachedJudge(Judge):
    """``judge`` behind ``cache``: cached judgments are returned as stored; only the rest are asked.
    ``hits`` / ``misses`` count the pairs and scores answered each way."""

    def __init__(self, judge: Judge, cache: JudgmentCache) -> None:
        self.judge = judge
        self.cache = cache
        self.spec = judge.spec
        self.template_text = judge.template_text
        self.sees_images = judge.sees_images
        self.hits = 0
        self.misses = 0

    def _key(self, kind: str, *texts: Text, images: Sequence[bytes] = ()) -> str:
        digests = [images_digest(images)] if images else []
        return judgment_key(self.judge.identity, self.judge.template_text, kind, *texts, *digests)

    def judge_pairs(
        self, prompts: Sequence[Text], a: Sequence[Text], b: Sequence[Text], images: Images | None = None
    ) -> list[PairJudgment]:
        check_lengths(prompts, a, b)
        self.check_images(prompts, images)
        given = images if images and any(images) else None
        keys = [
            self._key("pair", p, x, y, images=given[i] if given else ())
            for i, (p, x, y) in enumerate(zip(prompts, a, b, strict=True))
        ]
        firsts = [text_digest(x) for x in a]
        results: list[PairJudgment | None] = [
            None if (v := self.cache.get(k, f)) is None else PairJudgment.from_dict(v) for k, f in zip(keys, firsts, strict=True)
        ]
        todo = [i for i, r in enumerate(results) if r is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            asked = ([prompts[i] for i in todo], [a[i] for i in todo], [b[i] for i in todo])
            # Images only when there are some: a judge written for text takes three arguments.
            fresh = self.judge.judge_pairs(*asked) if given is None else self.judge.judge_pairs(*asked, [given[i] for i in todo])
            self.cache.put_many([(keys[i], "pair", firsts[i], j.to_dict()) for i, j in zip(todo, fresh, strict=True)])
            for i, judgment in zip(todo, fresh, strict=True):
                results[i] = judgment
        return [r for r in results if r is not None]

    def score(self, prompts: Sequence[Text], responses: Sequence[Text], images: Images | None = None) -> list[float]:
        check_lengths(prompts, responses)
        self.check_images(prompts, images)
        given = images if images and any(images) else None
        keys = [
            self._key("score", p, r, images=given[i] if given else ())
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
        ]
        firsts = [text_digest(r) for r in responses]
        cached = [self.cache.get(k, f) for k, f in zip(keys, firsts, strict=True)]
        todo = [i for i, v in enumerate(cached) if v is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        values: list[float] = [float("nan") if v is None or v == "nan" else float(v) for v in cached]
        if todo:
            scored = ([prompts[i] for i in todo], [responses[i] for i in todo])
            fresh = self.judge.score(*scored) if given is None else self.judge.score(*scored, [given[i] for i in todo])
            self.cache.put_many(
                [(keys[i], "score", firsts[i], "nan" if math.isnan(s) else s) for i, s in zip(todo, fresh, strict=True)]
            )
            for i, value in zip(todo, fresh, strict=True):
                values[i] = float(value)
        return values
