"""Preference data: read and validate rows, tokenize with chat templates, and batch.

One example flows: file row -> :class:`PreferenceExample` (``read_preferences``) -> token ids
(``prepare_dataset``, cached on disk) -> :class:`~dpokit.data.batch.Batch` (``make_collator``: padded,
shared-prompt or packed layout).
"""

from dpokit.data.batch import Batch
from dpokit.data.collate import (
    LAYOUTS,
    BatchLayout,
    LengthGroupedSampler,
    PackedCollator,
    PaddedCollator,
    SharedPromptCollator,
    make_collator,
)
from dpokit.data.prepare import (
    DEFAULT_CACHE_DIR,
    PreparedDataset,
    PreparedItems,
    PrepareOptions,
    PrepareReport,
    prepare_dataset,
    prepare_from_examples,
    tokenizer_fingerprint,
)
from dpokit.data.reader import RANKED_MODES, ReadReport, expand_ranking, read_preferences
from dpokit.data.schema import SKIP_REASONS, InvalidRowError, PreferenceExample
from dpokit.data.tokenize import TRUNCATION_MODES, TokenizeReport, tokenize_examples

__all__ = [
    "Batch",
    "BatchLayout",
    "DEFAULT_CACHE_DIR",
    "InvalidRowError",
    "LengthGroupedSampler",
    "LAYOUTS",
    "PackedCollator",
    "PaddedCollator",
    "SharedPromptCollator",
    "PrepareOptions",
    "PrepareReport",
    "PreparedDataset",
    "PreparedItems",
    "PreferenceExample",
    "RANKED_MODES",
    "ReadReport",
    "SKIP_REASONS",
    "TRUNCATION_MODES",
    "TokenizeReport",
    "expand_ranking",
    "make_collator",
    "prepare_dataset",
    "prepare_from_examples",
    "read_preferences",
    "tokenize_examples",
    "tokenizer_fingerprint",
]
