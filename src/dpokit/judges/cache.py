"""Every judgment on disk, so a rerun or a resumed evaluation costs nothing and gives the same numbers.

The cache is one JSONL file; a line is ``{"key": ..., "kind": "pair"|"score", "value": ...}``, where
``key = sha256(judge identity, template text, kind, prompt, response A[, response B])`` -- the order of
A and B is part of the key, so the two orders of a pair are two entries. Lines are appended and flushed
one at a time under a lock (several threads of one judge may answer at once); a line cut short by a
crash is skipped when the file is read back. Unparseable judgments are cached too: a rerun reproduces
them instead of asking again.

:class:`CachedJudge` wraps any judge: it answers what the file knows and asks the judge only for the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpokit.judges.base import Judge, PairJudgment, Text, check_lengths

DEFAULT_CACHE = ".dpokit_cache/judgments/judgments.jsonl"


def judgment_key(identity: str, template: str, kind: str, *texts: Text) -> str:
    payload = json.dumps([identity, template, kind, *texts], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgmentCache:
    """An append-only JSONL file of judgments, loaded into memory when opened."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, Any] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._entries[str(row["key"])] = row["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted run

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any:
        return self._entries.get(key)

    def put_many(self, items: Sequence[tuple[str, str, Any]]) -> None:
        """Store ``(key, kind, value)`` entries: appended, flushed and fsynced together."""
        if not items:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                for key, kind, value in items:
                    self._entries[key] = value
                    handle.write(json.dumps({"key": key, "kind": kind, "value": value}, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())


class CachedJudge(Judge):
    """``judge`` behind ``cache``: cached judgments are returned as stored; only the rest are asked.
    ``hits`` / ``misses`` count the pairs and scores answered each way."""

    def __init__(self, judge: Judge, cache: JudgmentCache) -> None:
        self.judge = judge
        self.cache = cache
        self.spec = judge.spec
        self.template_text = judge.template_text
        self.hits = 0
        self.misses = 0

    def _key(self, kind: str, *texts: Text) -> str:
        return judgment_key(self.judge.identity, self.judge.template_text, kind, *texts)

    def judge_pairs(self, prompts: Sequence[Text], a: Sequence[Text], b: Sequence[Text]) -> list[PairJudgment]:
        check_lengths(prompts, a, b)
        keys = [self._key("pair", p, x, y) for p, x, y in zip(prompts, a, b, strict=True)]
        results: list[PairJudgment | None] = [
            None if (v := self.cache.get(k)) is None else PairJudgment.from_dict(v) for k in keys
        ]
        todo = [i for i, r in enumerate(results) if r is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = self.judge.judge_pairs([prompts[i] for i in todo], [a[i] for i in todo], [b[i] for i in todo])
            self.cache.put_many([(keys[i], "pair", j.to_dict()) for i, j in zip(todo, fresh, strict=True)])
            for i, judgment in zip(todo, fresh, strict=True):
                results[i] = judgment
        return [r for r in results if r is not None]

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        check_lengths(prompts, responses)
        keys = [self._key("score", p, r) for p, r in zip(prompts, responses, strict=True)]
        cached = [self.cache.get(k) for k in keys]
        todo = [i for i, v in enumerate(cached) if v is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        values: list[float] = [float("nan") if v is None or v == "nan" else float(v) for v in cached]
        if todo:
            fresh = self.judge.score([prompts[i] for i in todo], [responses[i] for i in todo])
            self.cache.put_many([(keys[i], "score", "nan" if math.isnan(s) else s) for i, s in zip(todo, fresh, strict=True)])
            for i, value in zip(todo, fresh, strict=True):
                values[i] = float(value)
        return values
