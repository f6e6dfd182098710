"""The one call a training run makes: read + validate + tokenize + truncate, cached on disk.

The cache key (:attr:`PreparedDataset.fingerprint`) is a SHA-256 over

* the data's content (file bytes, every file of a directory, a ``datasets`` fingerprint, or the
  in-memory examples),
* the tokenizer (its serialized vocabulary/merges/normalizer, special tokens, chat template, class),
* every setting that changes the output (format, columns, split, skip_invalid, ranked_mode,
  max_length, max_prompt_length, truncation_mode) and a format version.

So a second run with the same inputs loads the token arrays in milliseconds, and a change to any of
them re-tokenizes. Entries are written to a temporary directory and renamed into place, so an
interrupted run never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from dpokit.compat import serialized_tokenizer, tokenizer_backend
from dpokit.data.images import ImageTable, ImageTokens
from dpokit.data.reader import ReadReport, check_read_options, describe_source, read_preferences, source_fingerprint
from dpokit.data.schema import PreferenceExample
from dpokit.data.tokenize import TokenizedColumns, TokenizeReport, check_truncation_settings, tokenize_examples
from dpokit.errors import DataError

if TYPE_CHECKING:
    from dpokit.config import DataConfig

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = "dpokit-prepared-v2"  # v2: examples whose responses tokenize identically are dropped
DEFAULT_CACHE_DIR = ".dpokit_cache"
_ARRAYS = ("tokens", "segment_offsets", "example_segments")


@dataclass
class PrepareReport:
    """The read report (rows, formats, skips) and the tokenization report (truncation, drops)."""

    read: ReadReport
    tokenize: TokenizeReport

    def summary(self) -> str:
        return f"{self.read.summary()}\n{self.tokenize.summary()}"

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read.to_dict(), "tokenize": self.tokenize.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrepareReport:
        return cls(ReadReport.from_dict(data["read"]), TokenizeReport.from_dict(data["tokenize"]))


class PreparedItems(Sequence[dict[str, Any]]):
    """``items[i] -> {"example_id": i, "prompt_ids": list[int], "response_ids": list[list[int]]}``.

    Backed by flat numpy arrays; dicts are built on access. ``response_ids`` are ranked best first
    (``[chosen, rejected]`` for pairs). Unpaired data (one response each) adds ``"desirable": bool``;
    data with images adds ``"images": list[bytes]`` (the prompt's images, encoded, in placeholder order).
    """

    def __init__(self, columns: TokenizedColumns, desirable: np.ndarray | None = None, images: ImageTable | None = None):
        self.columns = columns
        self.desirable = desirable
        self.images = images

    def __len__(self) -> int:
        return len(self.columns)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} examples")
        prompt, responses = self.columns.example(index)
        item: dict[str, Any] = {"example_id": index, "prompt_ids": prompt, "response_ids": responses}
        if self.desirable is not None:
            item["desirable"] = bool(self.desirable[index])
        if self.images is not None:
            item["images"] = self.images.example(index)
        return item


@dataclass
class PreparedDataset:
    """A tokenized preference dataset, ready for :class:`~dpokit.data.collate.PaddedCollator`.

    Attributes:
        items: ``items[i]`` -> ``{"example_id": i, "prompt_ids", "response_ids"}`` (example ids are
            0..len-1, stable for a given fingerprint: they key precomputed reference log-probs).
        fingerprint: SHA-256 hex of data content + tokenizer + settings (the cache key).
        report: :class:`PrepareReport` (``.summary()`` for a printable account).
        sources: provenance (``"path:line N"``) of each kept example.
        from_cache: True when the arrays were loaded from the on-disk cache.
        cache_path: the cache entry directory, or None when caching was off.

    Also a map-style dataset: ``len(ds)``, ``ds[i]`` (= ``ds.items[i]``), so
    ``DataLoader(ds, collate_fn=PaddedCollator(pad_id))`` works.
    """

    columns: TokenizedColumns
    fingerprint: str
    report: PrepareReport
    sources: list[str]
    from_cache: bool = False
    cache_path: Path | None = None
    desirable: np.ndarray | None = None  # (E,) bool for unpaired data: True = desirable, False = undesirable
    images: ImageTable | None = None  # the prompts' images, for data that has any

    @property
    def items(self) -> PreparedItems:
        return PreparedItems(self.columns, self.desirable, self.images)

    @property
    def lengths(self) -> np.ndarray:
        """(E,) prompt + longest response per example: what a padded row needs (for length grouping)."""
        return self.columns.lengths()

    @property
    def block_lengths(self) -> np.ndarray:
        """(E,) prompt + all responses per example: what a shared-prompt / packed block needs."""
        return self.columns.block_lengths()

    @property
    def max_responses(self) -> int:
        """The largest K in the dataset (2 for pairs)."""
        return int(np.diff(self.columns.example_segments).max()) - 1 if len(self) else 0

    def __len__(self) -> int:
        return len(self.columns)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


# ----------------------------------------------------------------------------------------------
# Fingerprints


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 over what decides the token ids: the serialized tokenizer, special tokens, chat template."""
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    backend = tokenizer_backend(tokenizer)
    if backend is not None:
        digest.update(serialized_tokenizer(backend).encode())
    else:  # slow tokenizers: the vocabulary and init settings
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(repr(sorted(getattr(tokenizer, "init_kwargs", {}).items())).encode())
    specials = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "all": sorted(map(str, tokenizer.all_special_tokens)),
        "added": sorted((str(t), int(i)) for t, i in tokenizer.get_added_vocab().items()),
    }
    digest.update(json.dumps(specials, sort_keys=True).encode())
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps(template, sort_keys=True).encode())
    return digest.hexdigest()


def _settings_fingerprint(**settings: Any) -> str:
    return json.dumps({"version": CACHE_FORMAT_VERSION, **settings}, sort_keys=True, default=repr)


def _combine(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def examples_fingerprint(examples: Sequence[PreferenceExample]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps(ex.to_dict(), sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# The on-disk cache


def _entry_dir(cache_dir: str | os.PathLike[str] | None, fingerprint: str) -> Path:
    return Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR) / f"prepared-{fingerprint[:40]}"


def _load_entry(path: Path, fingerprint: str) -> PreparedDataset | None:
    meta_file = path / "meta.json"
    if not meta_file.exists():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("fingerprint") != fingerprint:
            return None
        arrays = {name: np.load(path / f"{name}.npy") for name in _ARRAYS}
        desirable = np.load(path / "desirable.npy") if meta.get("unpaired") else None
        report = PrepareReport.from_dict(meta["report"])
        sources = meta["sources"]
        columns = TokenizedColumns(**arrays)
        _check_columns(columns, len(sources), desirable)
        images = None
        if meta.get("images"):  # memory-mapped: the images are read as batches need them
            images = ImageTable(*(np.load(path / f"image_{name}.npy", mmap_mode="r") for name in ImageTable.ARRAYS))
            images.check(len(sources))
    except Exception as error:  # a damaged entry is rebuilt, never trusted
        logger.warning("ignoring unreadable cache entry %s (%s); re-tokenizing", path, error)
        return None
    return PreparedDataset(
        columns, fingerprint, report, sources, from_cache=True, cache_path=path, desirable=desirable, images=images
    )


def _check_columns(columns: TokenizedColumns, num_sources: int, desirable: np.ndarray | None) -> None:
    """A cache entry's arrays must describe ``num_sources`` examples consistently (else it is rebuilt)."""
    tokens, offsets, examples = columns.tokens, columns.segment_offsets, columns.example_segments
    for name, array in (("tokens", tokens), ("segment_offsets", offsets), ("example_segments", examples)):
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise ValueError(f"{name} is not a 1-d integer array")
    consistent = (
        len(offsets) >= 1
        and offsets[0] == 0
        and offsets[-1] == len(tokens)
        and bool(np.all(np.diff(offsets) >= 0))
        and len(examples) == num_sources + 1
        and examples[0] == 0
        and examples[-1] == len(offsets) - 1
        and bool(np.all(np.diff(examples) >= 1))
        and (desirable is None or desirable.shape == (num_sources,))
    )
    if not consistent:
        raise ValueError("the arrays do not fit together")


def _save_entry(path: Path, dataset: PreparedDataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(dataset.columns, name))
        meta: dict[str, Any] = {
            "fingerprint": dataset.fingerprint,
            "report": dataset.report.to_dict(),
            "sources": dataset.sources,
        }
        if dataset.desirable is not None:
            np.save(tmp / "desirable.npy", dataset.desirable)
            meta["unpaired"] = True
        if dataset.images is not None:
            for name in ImageTable.ARRAYS:
                np.save(tmp / f"image_{name}.npy", getattr(dataset.images, name))
            meta["images"] = True
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, path)  # atomic: readers see no entry or a complete one
        except OSError:  # an entry is there: another process's (equivalent), or one that was rejected
            _replace_rejected_entry(tmp, path, dataset.fingerprint)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_rejected_entry(tmp: Path, path: Path, fingerprint: str) -> None:
    """``tmp`` holds a fresh entry but ``path`` exists. An entry that loads is kept (another process
    wrote it first); one that was rejected (damaged, unsafe, another fingerprint) is moved aside and
    replaced, so later runs do not re-tokenize every time."""
    if _load_entry(path, fingerprint) is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=path.parent))
    try:
        os.rename(path, stale / "entry")
        os.rename(tmp, path)
        logger.warning("replaced the unusable cache entry %s", path)
    except OSError:  # lost a race with another process replacing it: theirs is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Entry points


def _build(
    examples: Sequence[PreferenceExample],
    read_report: ReadReport,
    tokenizer: Any,
    fingerprint: str,
    tokenize_settings: dict[str, Any],
) -> PreparedDataset:
    """Tokenize and truncate (``tokenize_settings``: the keyword arguments of :func:`tokenize_examples`)."""
    columns, kept, tokenize_report = tokenize_examples(examples, tokenizer, **tokenize_settings)
    report = PrepareReport(read_report, tokenize_report)
    if len(columns) == 0:
        raise DataError(f"no examples left after tokenization of {read_report.source}.\n{report.summary()}")
    desirable = None
    if any(ex.label is not None for ex in examples):
        desirable = np.fromiter((bool(examples[i].label) for i in kept), dtype=bool, count=len(kept))
    images = ImageTable.from_lists([examples[i].images or [] for i in kept]) if any(ex.has_images for ex in examples) else None
    return PreparedDataset(columns, fingerprint, report, [examples[i].source for i in kept], desirable=desirable, images=images)


def _cached(
    fingerprint: str, cache_dir: Any, use_cache: bool, build: Callable[[], PreparedDataset], source: str | None = None
) -> PreparedDataset:
    """The cache entry of ``fingerprint`` or ``build()``'s result, saved. An entry made from another file with
    the same content (``source``: the one asked for now) is reported and located as this one."""
    path = _entry_dir(cache_dir, fingerprint) if use_cache else None
    if path is not None:
        hit = _load_entry(path, fingerprint)
        if hit is not None:
            logger.info("loaded tokenized data from cache %s", path)
            if source is not None and hit.report.read.source != source:
                old = hit.report.read.source
                hit.sources = [source + name[len(old) :] if name.startswith(old) else name for name in hit.sources]
                hit.report.read.source = source
            return hit
    dataset = build()
    if path is not None:
        _save_entry(path, dataset)
        dataset.cache_path = path
    logger.info("%s", dataset.report.summary())
    return dataset


@dataclass(frozen=True)
class PrepareOptions:
    """How :func:`prepare_dataset` reads, tokenizes and truncates a data set. With the source's and the
    tokenizer's fingerprints, these fields are the tokenized-data cache key.

    Fields:
        format: ``"auto"`` | ``"standard"`` | ``"conversational"`` | ``"hh"`` | ``"ranked"``.
        columns: ``{source column: field}`` renames (fields: prompt, chosen, rejected, responses, scores).
        split: split of a ``DatasetDict`` / ``load_dataset`` source.
        skip_invalid: skip (and count) invalid rows instead of stopping at the first one.
        ranked_mode: ``"listwise"`` keeps K-response rankings; ``"all_pairs"`` | ``"best_vs_rest"`` |
            ``"best_vs_worst"`` expand them to pairs.
        max_length: most tokens in prompt + one response (None: no limit). Paper default 512.
        max_prompt_length: the prompt is cut to this many tokens when prompt + longest response
            exceeds ``max_length`` (None: never cut the prompt). Paper default 256.
        truncation_mode: ``"keep_end"`` (default: keep the prompt's last tokens, i.e. the latest
            dialogue turns; a leading BOS is kept) or ``"keep_start"`` (keep its first tokens).
        unpaired, score_threshold: read for an unpaired objective (KTO): see
            :func:`~dpokit.data.reader.read_preferences`; the items then carry ``"desirable"``.
    """

    format: str = "auto"
    columns: Mapping[str, str] | None = None
    split: str = "train"
    skip_invalid: bool = False
    ranked_mode: str = "listwise"
    max_length: int | None = 512
    max_prompt_length: int | None = 256
    truncation_mode: str = "keep_end"
    unpaired: bool = False
    score_threshold: float | None = None

    @classmethod
    def from_config(cls, data: DataConfig, *, unpaired: bool = False, **changes: Any) -> PrepareOptions:
        """The options of a config's ``data`` section (its training split), with ``changes`` applied."""
        options = cls(
            format=data.format,
            columns=data.columns,
            split=data.train_split,
            skip_invalid=data.skip_invalid,
            ranked_mode=data.ranked_mode,
            max_length=data.max_length,
            max_prompt_length=data.max_prompt_length,
            truncation_mode=data.truncation_mode,
            unpaired=unpaired,
            score_threshold=data.score_threshold,
        )
        return replace(options, **changes)

    def check(self) -> None:
        """A ConfigError naming the setting when a value is not one dpokit knows."""
        check_read_options(self.format, self.ranked_mode)
        check_truncation_settings(self.max_length, self.max_prompt_length, self.truncation_mode)

    def tokenize_settings(self) -> dict[str, Any]:
        return dict(
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            truncation_mode=self.truncation_mode,
            skip_invalid=self.skip_invalid,
        )

    def fingerprint(self, processor: Any = None) -> str:
        """The settings part of the cache key (a processor adds its image-token settings)."""
        return _settings_fingerprint(
            format=self.format,
            columns=dict(self.columns) if self.columns else None,
            split=self.split,
            ranked_mode=self.ranked_mode,
            **self.tokenize_settings(),
            **({"unpaired": True, "score_threshold": self.score_threshold} if self.unpaired else {}),
            **({"images": ImageTokens(processor).fingerprint()} if processor is not None else {}),
        )


def prepare_dataset(
    source: Any,
    tokenizer: Any,
    options: PrepareOptions | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    processor: Any = None,
) -> PreparedDataset:
    """Read, validate, tokenize and truncate a preference dataset, with an on-disk cache.

    Args:
        source: a data file (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``), a
            ``save_to_disk`` directory, a dataset name / directory for ``datasets.load_dataset``, a
            ``datasets.Dataset``, or a list of row dicts (see :func:`~dpokit.data.reader.read_preferences`).
        tokenizer: a Hugging Face tokenizer (fast tokenizers are much faster). Conversational data
            needs its ``chat_template``; plain text needs an ``eos_token``.
        options: how to read and tokenize (:class:`PrepareOptions`; None: its defaults, the paper's
            lengths 512 / 256).
        cache_dir: where tokenized data is cached; None means ``./.dpokit_cache``.
        use_cache: False to neither read nor write the cache.
        processor: a vision-language model's processor, for rows with images (items then carry ``"images"``;
            the key covers the data file and image settings, not the image files a row names).

    Returns:
        a :class:`PreparedDataset`; check ``.report.summary()`` for skips, truncation and drops.
    """
    o = options or PrepareOptions()
    o.check()
    fingerprint = _combine(source_fingerprint(source, split=o.split), tokenizer_fingerprint(tokenizer), o.fingerprint(processor))
    tokenize_settings = {**o.tokenize_settings(), **({"processor": processor} if processor is not None else {})}

    def build() -> PreparedDataset:
        examples, read_report = read_preferences(
            source,
            format=o.format,
            columns=o.columns,
            split=o.split,
            skip_invalid=o.skip_invalid,
            ranked_mode=o.ranked_mode,
            unpaired=o.unpaired,
            score_threshold=o.score_threshold,
        )
        return _build(examples, read_report, tokenizer, fingerprint, tokenize_settings)

    return _cached(fingerprint, cache_dir, use_cache, build, describe_source(source))


def prepare_from_examples(
    examples: Sequence[PreferenceExample],
    tokenizer: Any,
    options: PrepareOptions | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = False,
    drop_identical: bool = True,
    processor: Any = None,
) -> PreparedDataset:
    """Tokenize in-memory :class:`PreferenceExample` s (already validated; responses best first).

    Same tokenization, truncation and report as :func:`prepare_dataset`; of ``options`` only the
    tokenization settings apply (the examples are already read). Caching is off by default here
    (``use_cache=True`` keys it by the examples' content). ``drop_identical=False`` keeps examples whose
    responses tokenize identically (for scoring responses, not training on pairs). ``processor``: the
    image-text-to-text processor, for examples with images (as :func:`prepare_dataset`).
    """
    o = options or PrepareOptions()
    check_truncation_settings(o.max_length, o.max_prompt_length, o.truncation_mode)
    examples = list(examples)
    if not examples:
        raise DataError("prepare_from_examples got no examples")
    for ex in examples:
        if not isinstance(ex, PreferenceExample) or len(ex.responses) < 2:
            raise DataError(f"{getattr(ex, 'source', '') or 'example'}: expected a PreferenceExample with at least 2 responses")
    tokenize_settings = o.tokenize_settings()
    if not drop_identical:
        tokenize_settings["drop_identical"] = False
    vision = {"images": ImageTokens(processor).fingerprint()} if processor is not None else {}
    fingerprint = _combine(
        examples_fingerprint(examples), tokenizer_fingerprint(tokenizer), _settings_fingerprint(**tokenize_settings, **vision)
    )
    if processor is not None:
        tokenize_settings["processor"] = processor
    read_report = ReadReport(source=describe_source(examples), rows=len(examples), examples=len(examples))
    read_report.formats["in_memory"] = len(examples)
    return _cached(
        fingerprint, cache_dir, use_cache, lambda: _build(examples, read_report, tokenizer, fingerprint, tokenize_settings)
    )
