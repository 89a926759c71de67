"""A small reader for the ``.ts`` format of the UEA/UCR time-series classification archive.

Only what equal-length multivariate classification files use: ``#`` comments, ``@`` header lines
(``@problemName``, ``@dimensions``, ``@seriesLength``, ``@classLabel true a b c``, ...) and, after
``@data``, one case per line: the dimensions separated by ``:``, each a comma-separated series,
then the class label. ``?`` (a missing value) becomes NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class TsData:
    """A parsed ``.ts`` file.

    Attributes:
        x: float32 [cases, dimensions, length].
        y: int64 [cases], indices into ``classes``.
        classes: the class labels in the order of the ``@classLabel`` header.
        header: the ``@`` header values (lower-case keys without ``@``).
        comments: the ``#`` lines (the dataset's own description).
    """

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    header: dict[str, str] = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)


def read_ts(path: str | Path, classes: list[str] | None = None) -> TsData:
    """Read an equal-length ``.ts`` file; ``classes`` fixes the label order (default: the header's)."""
    header: dict[str, str] = {}
    comments: list[str] = []
    cases: list[list[list[float]]] = []
    labels: list[str] = []
    in_data = False
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            comments.append(line[1:].strip())
            continue
        if not in_data:
            if not line.startswith("@"):
                raise ValueError(f"{path}:{number}: expected a @header line before @data, found {line[:40]!r}")
            key, _, value = line[1:].partition(" ")
            if key.lower() == "data":
                in_data = True
            else:
                header[key.lower()] = value.strip()
            continue
        *dims, label = line.split(":")
        if not dims:
            raise ValueError(f"{path}:{number}: a case needs at least one dimension and a label")
        cases.append([[float("nan") if v == "?" else float(v) for v in d.split(",")] for d in dims])
        labels.append(label.strip())
    if not cases:
        raise ValueError(f"{path}: no cases after @data")
    lengths = {len(d) for case in cases for d in case}
    n_dims = {len(case) for case in cases}
    if len(lengths) != 1 or len(n_dims) != 1:
        raise ValueError(f"{path}: only equal-length series with a fixed number of dimensions are supported")
    if "dimensions" in header and int(header["dimensions"]) != n_dims.pop():
        raise ValueError(f"{path}: @dimensions says {header['dimensions']}, the cases disagree")
    if classes is None:
        declared = header.get("classlabel", "").split()
        classes = declared[1:] if declared and declared[0].lower() == "true" else sorted(set(labels))
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"{path}: labels {unknown} are not among the classes {classes}")
    y = np.array([classes.index(label) for label in labels], dtype=np.int64)
    return TsData(np.asarray(cases, dtype=np.float32), y, list(classes), header, comments)
