"""Read preference rows from files or ``datasets`` and validate them into :class:`PreferenceExample` s.

Sources: a ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` file, a directory written by
``datasets.Dataset.save_to_disk``, any other directory or a dataset name (through
``datasets.load_dataset``), or rows already in memory (a ``datasets.Dataset`` or a list of dicts).

Every row is validated (see :mod:`dpokit.data.formats`). By default the first invalid row stops the
read with a :class:`~dpokit.errors.DataError` naming the file, line/row and field; with
``skip_invalid=True`` invalid rows are skipped and counted per reason in the :class:`ReadReport`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpokit.compat import dataset_fingerprint
from dpokit.data.formats import FORMATS, check_columns, parse_row
from dpokit.data.schema import SKIP_REASONS, InvalidRowError, PreferenceExample
from dpokit.errors import ConfigError, DataError
from dpokit.locations import is_unreachable_hub_error, missing_local, missing_message

RANKED_MODES = ("listwise", "all_pairs", "best_vs_rest", "best_vs_worst")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
_SKIP_HINT = (
    "Fix the row, or set data.skip_invalid=true (skip_invalid=True in Python) to skip invalid rows "
    "(they are counted and reported)."
)
_MESSAGES_KEPT_PER_REASON = 3


@dataclass
class ReadReport:
    """What the reader saw: rows read, examples produced, and every skipped row counted by reason.

    Attributes:
        source: the file / dataset that was read.
        rows: input rows seen (blank JSONL/CSV lines are not rows and are counted in ``blank_lines``).
        examples: examples produced (after ranked-mode expansion).
        formats: rows per detected format (``standard``, ``conversational``, ``hh``, ``ranked``).
        skipped: skipped rows per reason (only with ``skip_invalid=True``; keys of ``SKIP_REASONS``).
        skipped_messages: the first few error messages per reason, so the user can look them up.
        pairs_from_rankings: pairs made from rankings with K > 2 responses (pair modes).
        tied_pairs_skipped: pairs not made because both responses had the same score (pair modes).
        rankings_with_ties: listwise rankings in which some (not all) scores tie; ties keep input order.
    """

    source: str = ""
    rows: int = 0
    examples: int = 0
    blank_lines: int = 0
    formats: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_messages: dict[str, list[str]] = field(default_factory=dict)
    ranked_mode: str = "listwise"
    pairs_from_rankings: int = 0
    tied_pairs_skipped: int = 0
    rankings_with_ties: int = 0
    desirable: int = 0
    undesirable: int = 0
    pairs_as_unpaired: int = 0

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def record_skip(self, error: InvalidRowError) -> None:
        self.skipped[error.reason] += 1
        kept = self.skipped_messages.setdefault(error.reason, [])
        if len(kept) < _MESSAGES_KEPT_PER_REASON:
            kept.append(str(error))

    def summary(self) -> str:
        formats = ", ".join(f"{n} {name}" for name, n in sorted(self.formats.items())) or "none"
        lines = [f"read {self.rows} rows from {self.source} ({formats}) -> {self.examples} examples"]
        if self.pairs_from_rankings:
            lines.append(f"  {self.pairs_from_rankings} pairs made from rankings ({self.ranked_mode})")
        if self.tied_pairs_skipped:
            lines.append(f"  {self.tied_pairs_skipped} pairs not made because their scores tie")
        if self.rankings_with_ties:
            lines.append(f"  {self.rankings_with_ties} rankings have tied scores (ties keep the input order)")
        if self.desirable or self.undesirable:
            lines.append(f"  {balance_summary(self.desirable, self.undesirable)}")
        if self.pairs_as_unpaired:
            lines.append(f"  {self.pairs_as_unpaired} pairs/rankings read as unpaired (best -> desirable, others -> undesirable)")
        if self.skipped:
            lines.append(f"  skipped {self.num_skipped} invalid rows:")
            for reason, count in self.skipped.most_common():
                lines.append(f"    {count:>7}  {reason}: {SKIP_REASONS.get(reason, reason)}")
                for message in self.skipped_messages.get(reason, []):
                    lines.append(f"             e.g. {message}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "examples": self.examples,
            "blank_lines": self.blank_lines,
            "formats": dict(self.formats),
            "skipped": dict(self.skipped),
            "skipped_messages": self.skipped_messages,
            "ranked_mode": self.ranked_mode,
            "pairs_from_rankings": self.pairs_from_rankings,
            "tied_pairs_skipped": self.tied_pairs_skipped,
            "rankings_with_ties": self.rankings_with_ties,
            "desirable": self.desirable,
            "undesirable": self.undesirable,
            "pairs_as_unpaired": self.pairs_as_unpaired,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReadReport:
        data = dict(data)
        data["formats"] = Counter(data.get("formats", {}))
        data["skipped"] = Counter(data.get("skipped", {}))
        return cls(**data)


# ----------------------------------------------------------------------------------------------
# Raw rows from each kind of source. Each yields (provenance, row dict | InvalidRowError).

RawRows = Iterator[tuple[str, Any]]


class _BlankLine:
    pass


_BLANK = _BlankLine()


def _jsonl_rows(path: Path, data: bytes | None = None, start_line: int = 1) -> RawRows:
    data = path.read_bytes() if data is None else data
    for number, raw in enumerate(data.split(b"\n"), start_line):
        if not raw.strip():
            yield f"{path}:line {number}", _BLANK
            continue
        where = f"{path}:line {number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield (
                where,
                InvalidRowError(
                    where, None, "not_utf8", f"byte {e.start + 1} of the line is not valid UTF-8; re-save the file as UTF-8"
                ),
            )
            continue
        try:
            yield where, json.loads(text.lstrip("\ufeff"))
        except ValueError as e:  # json.JSONDecodeError, or an out-of-range number
            detail = f"column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
            yield where, InvalidRowError(where, None, "malformed_json", f"malformed JSON ({detail})")
        except RecursionError:
            yield where, InvalidRowError(where, None, "malformed_json", _TOO_DEEP)


_TOO_DEEP = "malformed JSON (nested too deeply for Python's JSON parser; a preference row needs a few levels)"


def _check_not_json_array(path: Path, data: bytes) -> None:
    """A pretty-printed JSON array (or object) saved as ``.jsonl`` would fail on every line: say what it is."""
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith((b"[", b"{")):
        return
    try:
        json.loads(head.split(b"\n", 1)[0])
        return  # the first line is a whole JSON value: JSON Lines
    except (ValueError, RecursionError):
        pass
    try:
        document = json.loads(head)
    except (ValueError, RecursionError):
        return  # not one JSON document either: the line-by-line errors say where
    what = "a JSON array" if isinstance(document, list) else "one JSON object"
    raise DataError(
        f"{path}:line 1: the file is {what} spread over several lines (pretty-printed JSON), not JSON Lines "
        f"(one object per line); rename it to {path.with_suffix('.json').name} or write one row per line"
    )


def _json_rows(path: Path, split: str) -> RawRows:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:line {line}: not valid UTF-8 (byte {e.start + 1} of the file); re-save the file as UTF-8"
        ) from None
    try:
        document = json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as e:
        if e.msg.startswith("Extra data"):  # one JSON object per line: really JSON Lines
            yield from _jsonl_rows(path, data)
            return
        raise DataError(f"{path}:line {e.lineno}: malformed JSON (column {e.colno}: {e.msg})") from None
    except ValueError as e:
        raise DataError(f"{path}: malformed JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: {_TOO_DEEP}") from None
    if isinstance(document, dict):
        if isinstance(document.get(split), list):
            document = document[split]
        else:
            lists = [k for k, v in document.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
            if len(lists) == 1 and not any(k in document for k in ("chosen", "responses")):
                document = document[lists[0]]
            else:
                document = [document]  # a single example
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a JSON list of rows (or JSON Lines), got a JSON {type(document).__name__}")
    for number, row in enumerate(document, 1):
        yield f"{path}:row {number}", row


def _csv_rows(path: Path) -> RawRows:
    # Decode with surrogateescape so one bad byte spoils only its own row, which is then reported.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"{path}:line 1: malformed CSV header ({e})") from None
    if any(_has_surrogates(h) for h in header):
        raise DataError(f"{path}:line 1: the header is not valid UTF-8; re-save the file as UTF-8")
    last_line = reader.line_num
    while True:
        where = f"{path}:line {last_line + 1}"
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield where, InvalidRowError(where, None, "malformed_row", f"malformed CSV ({e})")
            last_line = reader.line_num
            continue
        last_line = reader.line_num
        if not cells or (len(cells) == 1 and not cells[0].strip() and len(header) > 1):
            yield where, _BLANK
        elif any(_has_surrogates(c) for c in cells):
            yield where, InvalidRowError(where, None, "not_utf8", "the row is not valid UTF-8; re-save the file as UTF-8")
        elif len(cells) != len(header):
            yield where, InvalidRowError(where, None, "malformed_row", f"has {len(cells)} cells but the header has {len(header)}")
        else:
            yield where, dict(zip(header, cells, strict=True))


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _parquet_rows(path: Path) -> RawRows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read Parquet file ({e})") from None
    for number, row in enumerate(table.to_pylist(), 1):
        yield f"{path}:row {number}", row


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or ((path / "state.json").exists() and (path / "dataset_info.json").exists())


def _pick_split(dataset: Any, split: str, where: str) -> Any:
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, dict)):
        if split not in dataset:
            raise DataError(f"{where}: has no split '{split}'; available splits: {', '.join(dataset.keys())}")
        return dataset[split]
    return dataset


def _load_datasets_source(source: str | Path, split: str) -> Any:
    """A ``save_to_disk`` directory via ``load_from_disk``; anything else via ``load_dataset``."""
    import datasets

    path = Path(source)
    if path.is_dir() and _is_saved_dataset(path):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: cannot load the saved dataset ({e})") from None
        return _pick_split(loaded, split, str(path))
    if missing_local(str(source), FILE_SUFFIXES):
        raise DataError(f"{source}: no such file or directory")
    try:
        return datasets.load_dataset(str(source), split=split)
    except Exception as e:  # offline hub, unknown name, bad files: all user-fixable
        if not path.exists() and is_unreachable_hub_error(e):
            raise DataError(missing_message(source, error=e)) from None
        raise DataError(
            f"cannot load '{source}' (split '{split}') with datasets.load_dataset: {type(e).__name__}: {e}. "
            "If the hub is unreachable, download the data and pass the local file or directory."
        ) from None


def _dataset_rows(dataset: Any, label: str) -> RawRows:
    for number, row in enumerate(dataset.to_list(), 1):
        yield f"{label}:row {number}", row


def describe_source(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__}>"


def _in_memory_dataset(source: Any, split: str) -> Any | None:
    """``source`` as a ``datasets.Dataset`` (``split`` of a ``DatasetDict``), or None when it is not one.

    Checked without importing ``datasets`` (seconds of start-up): a dataset object can only exist
    once its library has been imported."""
    datasets = sys.modules.get("datasets")
    if datasets is None:
        return None
    if isinstance(source, datasets.DatasetDict):
        source = _pick_split(source, split, "<DatasetDict>")
    return source if isinstance(source, datasets.Dataset) else None


def image_base_dir(source: Any) -> Path | None:
    """What image paths in ``source``'s rows are relative to: a data file's directory, a data directory
    itself; None (the working directory) for rows in memory and hub datasets."""
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return path.resolve().parent
    return path.resolve() if path.is_dir() else None


def raw_rows(source: Any, *, split: str = "train") -> tuple[RawRows, bool]:
    """Iterate raw rows of any supported source. Returns (rows, text_table) where ``text_table``
    says every cell is a string (CSV), so list-valued fields may hold JSON text."""
    dataset = _in_memory_dataset(source, split)
    if dataset is not None:
        return _dataset_rows(dataset, "dataset"), False
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return ((f"row {i}", row) for i, row in enumerate(source, 1)), False
    if not isinstance(source, (str, Path)):
        raise DataError(
            f"cannot read preference data from a {type(source).__name__}; pass a file path, directory, dataset name or rows"
        )
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            data = path.read_bytes()
            _check_not_json_array(path, data)
            return _jsonl_rows(path, data), False
        if suffix == ".json":
            return _json_rows(path, split), False
        if suffix in (".csv", ".tsv"):
            return _csv_rows(path), True
        if suffix == ".parquet":
            return _parquet_rows(path), False
        raise DataError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json, .csv, .tsv or .parquet")
    if path.is_dir():
        return _dataset_rows(_load_datasets_source(path, split), str(path)), False
    if missing_local(str(source), FILE_SUFFIXES):
        raise DataError(f"{source}: no such file or directory")
    return _dataset_rows(_load_datasets_source(str(source), split), str(source)), False


def file_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, row) for every row of a ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` file, with
    the reader's own checks: blank lines are passed over and the first unusable row (malformed JSON or
    CSV, not UTF-8, not an object) raises a :class:`DataError` naming its line. For the commands that
    read rows of their own shape (``dpokit score``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    rows, _ = raw_rows(path)
    for where, row in rows:
        if row is _BLANK:
            continue
        if isinstance(row, InvalidRowError):
            raise row
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def source_fingerprint(source: Any, *, split: str = "train") -> str:
    """A content hash of the data: file bytes, every file of a directory, or a dataset fingerprint."""
    digest = hashlib.sha256()
    dataset = _in_memory_dataset(source, split)
    if dataset is not None:
        digest.update(b"dataset:" + dataset_fingerprint(dataset).encode())
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        digest.update(b"rows:" + json.dumps(list(source), sort_keys=True, default=repr).encode())
    elif isinstance(source, (str, Path)) and Path(source).expanduser().is_file():
        digest.update(b"file:" + Path(source).expanduser().read_bytes())
    elif isinstance(source, (str, Path)) and Path(source).expanduser().is_dir():
        root = Path(source).expanduser()
        digest.update(b"dir:" + split.encode())
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(root)).encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    else:  # a dataset name: load (datasets caches it) and use its fingerprint
        dataset = _load_datasets_source(str(source), split)
        digest.update(b"name:" + str(source).encode() + b"\0" + dataset_fingerprint(dataset).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Rankings -> what the loss consumes


def expand_ranking(example: PreferenceExample, mode: str, report: ReadReport) -> list[PreferenceExample]:
    """Keep a ranking (``listwise``) or turn it into pairs.

    Pairs ``(i, j)`` with ``i`` ranked above ``j``: ``all_pairs`` every ``i < j``; ``best_vs_rest``
    ``(0, j)`` for every ``j > 0``; ``best_vs_worst`` only ``(0, K-1)``. With scores, a pair whose two
    scores tie is not a preference and is not made (counted in ``tied_pairs_skipped``).
    """
    scores = example.scores
    k = example.num_responses
    if mode == "listwise":
        if scores is not None and len(set(scores)) < len(scores):
            report.rankings_with_ties += 1
        return [example]
    if mode == "all_pairs":
        index_pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    elif mode == "best_vs_rest":
        index_pairs = [(0, j) for j in range(1, k)]
    else:  # best_vs_worst
        index_pairs = [(0, k - 1)]
    pairs = []
    for i, j in index_pairs:
        if scores is not None and scores[i] == scores[j]:
            report.tied_pairs_skipped += 1
            continue
        pair_scores = None if scores is None else [scores[i], scores[j]]
        source = example.source if k == 2 else f"{example.source} (responses {i}>{j})"
        pairs.append(
            PreferenceExample(
                example.prompt,
                [example.responses[i], example.responses[j]],
                pair_scores,
                source,
                truncated=example.truncation_of([i, j]),
                images=example.images,
                image_names=example.image_names,
            )
        )
    if k > 2:
        report.pairs_from_rankings += len(pairs)
    return pairs


# KTO paper (Ethayarajh et al., 2024, section 4.2): choose the weights so that
# desirable_weight * n_desirable / (undesirable_weight * n_undesirable) lies in [1, 4/3].
KTO_BALANCE_RANGE = (1.0, 4.0 / 3.0)


def suggest_kto_weights(desirable: int, undesirable: int) -> tuple[float, float, float] | None:
    """Weights for unbalanced unpaired data, as the KTO paper recommends (``KTO_BALANCE_RANGE``).

    Returns ``(desirable_weight, undesirable_weight, upper)``: one weight stays 1 and the other is the
    value that puts the ratio at 1; any value of that weight up to ``upper`` keeps the ratio within 4/3.
    None when the classes are already balanced with weights (1, 1) or one class is missing.
    """
    if desirable <= 0 or undesirable <= 0:
        return None
    ratio = desirable / undesirable
    low, high = KTO_BALANCE_RANGE
    if low <= ratio <= high:
        return None
    if ratio < low:  # too few desirable examples: weigh them up
        return undesirable / desirable, 1.0, high * undesirable / desirable
    return 1.0, ratio, ratio  # too many desirable: weigh undesirable up, to between ratio * 3/4 and ratio
    # (undesirable_weight = ratio gives exactly 1; ratio * 3/4 gives 4/3)


def balance_summary(desirable: int, undesirable: int) -> str:
    """The desirable/undesirable balance of unpaired data, with KTO's suggested weights when unbalanced."""
    total = max(desirable + undesirable, 1)
    line = f"unpaired labels: {desirable} desirable ({100 * desirable / total:.1f}%), {undesirable} undesirable"
    suggestion = suggest_kto_weights(desirable, undesirable)
    if suggestion is None:
        if desirable and undesirable:
            return line + "; balanced for KTO with weights 1 and 1"
        return line + "; only one class present -- KTO needs both to learn a contrast"
    d_weight, u_weight, upper = suggestion
    if d_weight != 1.0:
        advice = f"desirable_weight between {d_weight:.3g} and {upper:.3g} (undesirable_weight 1)"
    else:
        advice = f"undesirable_weight between {0.75 * u_weight:.3g} and {u_weight:.3g} (desirable_weight 1)"
    return line + f"; unbalanced: the KTO paper keeps w_D n_D / (w_U n_U) in [1, 4/3], e.g. {advice}"


def as_unpaired(example: PreferenceExample) -> list[PreferenceExample]:
    """A pair or ranking as unpaired examples: the best response desirable, every other undesirable.
    What the pairing said beyond that (which response beat which, for the same prompt) is lost."""
    if example.is_unpaired:
        return [example]
    labels = [True] + [False] * (example.num_responses - 1)
    return [
        PreferenceExample(
            example.prompt,
            [response],
            None,
            f"{example.source} (response {k})",
            label=label,
            truncated=example.truncation_of([k]),
            images=example.images,
            image_names=example.image_names,
        )
        for k, (response, label) in enumerate(zip(example.responses, labels, strict=True))
    ]


def _label_unpaired(example: PreferenceExample, score_threshold: float | None) -> None:
    """Give a scored unpaired example its label: desirable when score >= ``score_threshold``."""
    if example.label is not None or not example.is_unpaired:
        return
    if score_threshold is None or example.scores is None:
        raise ConfigError(
            f"{example.source}: an unpaired row with a 'score' needs a threshold (data.score_threshold): "
            "scores at or above it are desirable"
        )
    example.label = example.scores[0] >= score_threshold


def _finish_unpaired(examples: list[PreferenceExample], report: ReadReport, unpaired: bool) -> list[PreferenceExample]:
    """Unpaired objectives: pairs/rankings become unpaired examples and the balance is counted.
    Paired objectives refuse unpaired rows (one completion and a label is not a preference)."""
    if not unpaired:
        single = next((ex for ex in examples if ex.is_unpaired), None)
        if single is not None:
            raise DataError(
                f"{single.source}: an unpaired row (prompt, completion, label) cannot train a paired objective; "
                "use an unpaired loss (kto, apo_zero_unpaired) or pair the data"
            )
        return examples
    out: list[PreferenceExample] = []
    for example in examples:
        report.pairs_as_unpaired += not example.is_unpaired
        out.extend(as_unpaired(example))
    report.desirable = sum(bool(ex.label) for ex in out)
    report.undesirable = len(out) - report.desirable
    return out


def check_read_options(format: str, ranked_mode: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"unknown data format '{format}'; valid formats: {', '.join(FORMATS)}")
    if ranked_mode not in RANKED_MODES:
        raise ConfigError(f"unknown ranked_mode '{ranked_mode}'; valid modes: {', '.join(RANKED_MODES)}")


def read_preferences(
    source: Any,
    *,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    ranked_mode: str = "listwise",
    unpaired: bool = False,
    score_threshold: float | None = None,
) -> tuple[list[PreferenceExample], ReadReport]:
    """Read and validate preference rows.

    Args:
        source: a ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` file; a ``save_to_disk``
            directory; another directory or a dataset name (loaded with ``datasets.load_dataset``);
            a ``datasets.Dataset``/``DatasetDict``; or a list of row dicts.
        format: ``"auto"`` (detect per row), ``"standard"``, ``"conversational"``, ``"hh"`` or
            ``"ranked"`` (see :mod:`dpokit.data.formats`). A row may carry prompt images
            (``images``: paths relative to the data file, bytes, ``datasets`` Image values, PIL images;
            see :mod:`dpokit.data.images`).
        columns: ``{source column: field}`` renames, fields being ``prompt``, ``chosen``,
            ``rejected``, ``responses``, ``scores``; e.g. ``{"question": "prompt",
            "response_j": "chosen", "response_k": "rejected"}``.
        split: the split of a ``DatasetDict`` / ``load_dataset`` source (or a top-level key of a JSON file).
        skip_invalid: False (default): the first invalid row raises :class:`DataError` naming file,
            line/row and field. True: invalid rows are skipped and counted per reason in the report.
        ranked_mode: how rankings with K > 2 responses are used: ``"listwise"`` keeps them whole
            (for the Plackett-Luce loss); ``"all_pairs"``, ``"best_vs_rest"``, ``"best_vs_worst"``
            expand them into chosen/rejected pairs.
        unpaired: read for an unpaired objective (KTO): unpaired rows (``prompt``, ``completion``,
            ``label`` or ``score``) are kept, pairs and rankings become unpaired examples (best
            response desirable, the others undesirable), and the report counts the balance. False:
            unpaired rows are an error.
        score_threshold: unpaired rows with a ``score`` are desirable when score >= this.

    Returns:
        ``(examples, report)``: examples with responses ranked best first, and a :class:`ReadReport`.

    Raises:
        DataError: an invalid row (without ``skip_invalid``), an unreadable source, or no valid rows.
        ConfigError: an unknown ``format``/``ranked_mode`` or a bad ``columns`` mapping.
    """
    check_read_options(format, ranked_mode)
    inverse_columns = check_columns(columns)
    report = ReadReport(source=describe_source(source), ranked_mode=ranked_mode)
    rows, text_table = raw_rows(source, split=split)
    base_dir = image_base_dir(source)
    examples: list[PreferenceExample] = []
    for where, raw in rows:
        if raw is _BLANK:
            report.blank_lines += 1
            continue
        report.rows += 1
        try:
            if isinstance(raw, InvalidRowError):
                raise raw
            example, detected = parse_row(
                raw, where, format=format, inverse_columns=inverse_columns, text_table=text_table, base_dir=base_dir
            )
        except InvalidRowError as error:
            if not skip_invalid:
                raise DataError(f"{error}. {_SKIP_HINT}") from None
            report.record_skip(error)
            continue
        report.formats[detected] += 1
        _label_unpaired(example, score_threshold)
        examples.extend(expand_ranking(example, ranked_mode, report))
    examples = _finish_unpaired(examples, report, unpaired)
    report.examples = len(examples)
    if not examples:
        raise DataError(f"no valid preference examples in {report.source}.\n{report.summary()}")
    return examples, report
