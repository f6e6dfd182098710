"""``dpokit label``: human judgments in the browser, and a judge's agreement with them.

* :mod:`~dpokit.analysis.label.pairs` -- the pairs to label, from the files dpokit writes;
* :mod:`~dpokit.analysis.label.store` -- the label file (whole lines, fsync'd, resumed);
* :mod:`~dpokit.analysis.label.server` -- the local page and its JSON routes;
* :mod:`~dpokit.analysis.label.check` -- ``dpokit judge-check`` on a label file.
"""

from __future__ import annotations

from dpokit.analysis.label.pairs import LabelPair, read_label_pairs
from dpokit.analysis.label.server import LabelJob, make_label_server, run_label
from dpokit.analysis.label.store import HumanLabel, LabelFile, is_label_file, read_labels

__all__ = [
    "HumanLabel",
    "LabelFile",
    "LabelJob",
    "LabelPair",
    "is_label_file",
    "make_label_server",
    "read_label_pairs",
    "read_labels",
    "run_label",
]
