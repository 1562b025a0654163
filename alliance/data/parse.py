"""Parsing a CSV file's data lines into arrays, fast and exact at the same time.

- The fast path is one ``pandas.read_csv`` pass (C engine, float dtypes, read in chunks into
  preallocated arrays) followed by vectorised numpy checks (finite, value ranges, integer
  labels); a flagged row maps back to its physical line, and that one line is re-checked by the
  exact rules to build the error.
- When pandas cannot parse the file (a row with extra cells, a non-numeric cell, bad UTF-8, ...)
  the file is parsed again in line-aligned blocks, and the first block pandas rejects is scanned
  line by line with the exact rules (``csv`` module), which find the first bad line and cell.

The exact rules for a line (:func:`_line_cells`) and a cell (:func:`_cell_value`) also read the
label column alone: the labels ``split_dataset`` shares out (:func:`class_labels`), with the same
errors, and the labels of prediction input, which only serve to report an accuracy.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alliance.data.csvfile import (
    NUMBER_RE,
    CsvFile,
    Layout,
    delimiter_name,
    read_csv_file,
    read_layout,
    split_csv_line,
)
from alliance.data.errors import DataError
from alliance.data.schema import DataSchema, coerce_schema

log = logging.getLogger(__name__)

_BLOCK_BYTES = 4 << 20  # block size for the error-locating pass
_CHUNK_CELLS = 8_000_000  # cells per pandas chunk
_PLAIN_BYTES = b'0123456789.+-eE \t\n"'  # all that plain numeric CSV is made of

# Cells that pandas reads as missing values (its default na_values), lower-cased.
_NA_STRINGS = frozenset(
    s.lower()
    for s in (
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
        "+nan",
    )
)
_INF_STRINGS = frozenset(f"{sign}{word}" for sign in ("", "+", "-") for word in ("inf", "infinity"))

_Rows = tuple["np.ndarray | None", np.ndarray]  # labels (float64) or None, features (float32)


def parse_csv(path: Path, file: str, schema: DataSchema) -> tuple[np.ndarray, np.ndarray]:
    """A labelled data file, checked by every rule: ``x`` float32 of shape
    ``(n, *feature_shape)``, scaled, and ``y`` int64 labels. ``file`` names it in errors."""
    csv_file = read_csv_file(path, file)
    return _arrays(csv_file, read_layout(csv_file, schema, labelled=True))


def read_features_csv(
    path: str | os.PathLike, schema: DataSchema | Mapping | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features of a CSV for prediction: ``x`` of shape ``(n, *feature_shape)``, float32, scaled,
    and the file's labels when it has a label column, else None.

    The label column is optional and its values are not checked: a cell that is not a number
    gives NaN (they only serve to report an accuracy). The feature cells are checked by the same
    rules (and give the same errors) as :func:`~alliance.data.load_split`. Not cached.
    """
    schema = coerce_schema(schema)
    p = Path(path)
    if not p.exists():
        raise DataError("missing-file", f"{p} does not exist", file=str(path))
    csv_file = read_csv_file(p, str(path))
    layout = read_layout(csv_file, schema, labelled=False)
    x, _ = _arrays(csv_file, layout)
    if layout.skip_idx is None:
        return x, None
    return x, _unchecked_labels(csv_file, layout)


def _arrays(csv_file: CsvFile, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` of a file whose header gave ``layout`` (``y`` is empty when unlabelled)."""
    csv_file.require_rows()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels, feats = _parse_rows(csv_file.data, 2, layout)
    schema = layout.schema
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if schema.scale != 1.0:
        np.divide(feats, np.float32(schema.scale), out=feats)
    x = feats.reshape((feats.shape[0], *schema.feature_shape))
    y = labels.astype(np.int64) if labels is not None else np.zeros(0, dtype=np.int64)
    return x, y


# --------------------------------------------------------------------------------------------
# Rows: the fast path, the block pass and the exact per-line rules


def _parse_rows(data: bytes, first_line: int, layout: Layout) -> _Rows:
    """Parse data lines (each ending in '\\n') starting at physical line ``first_line``."""
    rows = _fast_rows(data, first_line, layout)
    if rows is not None:
        return rows
    if len(data) > _BLOCK_BYTES:  # a large file: find the first bad block, then the line
        return _parse_blocks(data, first_line, layout)
    return _exact_rows(data, first_line, layout)


def _parse_blocks(data: bytes, first_line: int, layout: Layout) -> _Rows:
    """Parse line-aligned blocks in order: the first error in the file is the one raised."""
    parts = []
    start, line = 0, first_line
    while start < len(data):
        end = data.find(b"\n", min(start + _BLOCK_BYTES, len(data)) - 1) + 1
        block = data[start:end]
        rows = _fast_rows(block, line, layout)
        parts.append(rows if rows is not None else _exact_rows(block, line, layout))
        line += block.count(b"\n")
        start = end
    labels = None if layout.label_idx is None else np.concatenate([p[0] for p in parts])
    return labels, np.concatenate([p[1] for p in parts])


def _fast_rows(data: bytes, first_line: int, layout: Layout) -> _Rows | None:
    """pandas and vectorised checks; None when pandas refuses the data (then only the exact
    rules can say where the problem is)."""
    # pandas reads a column that is all True/False within one of its internal chunks as 1/0:
    # data with such words goes to the exact pass.
    if _may_hold_booleans(data, layout):
        return None
    rows = _pandas_rows(data, data.count(b"\n"), layout)
    if rows is None:
        return None
    # pandas silently drops extra cells on the first row: the exact check catches that.
    _parse_line(data[: data.find(b"\n")], first_line, layout)
    bad = _flagged_rows(rows, layout)
    if bad.size == 0:
        return rows
    offsets = _LineOffsets(data)
    for r in bad[:1000]:
        _parse_line(offsets.line(int(r)), first_line + int(r), layout)  # raises
    # flagged by the float32 checks but fine by the exact rules: take the exact scan
    return _exact_rows(data, first_line, layout)


def _may_hold_booleans(data: bytes, layout: Layout) -> bool:
    if b"e" not in data and b"E" not in data:  # memchr: instant on typical numeric data
        return False
    rest = data.translate(None, _PLAIN_BYTES + layout.schema.delimiter.encode())
    low = rest.lower()  # "true" / "false" without their e: "tru", "fals"
    return b"tru" in low or b"fals" in low


def _pandas_rows(data: bytes, nlines: int, layout: Layout) -> _Rows | None:
    """pandas.read_csv in chunks of rows, copied into preallocated C-ordered arrays (which keeps
    the peak memory near the size of the result). None when pandas refuses the data or finds
    another number of rows than there are lines: the exact pass then explains the problem."""
    nfeat = len(layout.feature_idx)
    feature_cols = list(layout.feature_idx)
    dtype: dict[int, Any] = {j: np.float32 for j in feature_cols}
    if layout.label_idx is not None:
        dtype[layout.label_idx] = np.float64
    if layout.skip_idx is not None:  # read, not converted (usecols would let extra cells pass)
        dtype[layout.skip_idx] = object
    labels = np.empty(nlines, dtype=np.float64) if layout.label_idx is not None else None
    feats = np.empty((nlines, nfeat), dtype=np.float32)
    pos = 0
    try:
        with pd.read_csv(
            io.BytesIO(data),
            sep=layout.schema.delimiter,
            header=None,
            names=list(range(layout.ncols)),
            dtype=dtype,
            engine="c",
            index_col=False,
            skip_blank_lines=False,
            encoding="utf-8",
            chunksize=max(1024, _CHUNK_CELLS // layout.ncols),
        ) as reader:
            for df in reader:
                k = len(df)
                if pos + k > nlines:
                    return None
                if labels is not None:
                    labels[pos : pos + k] = df[layout.label_idx].to_numpy(dtype=np.float64)
                feats[pos : pos + k] = df[feature_cols].to_numpy(dtype=np.float32)
                pos += k
    except Exception as exc:  # any refusal: the exact pass finds and explains the problem
        log.debug("pandas could not parse %s (%s); locating the problem", layout.file, exc)
        return None
    if pos != nlines:
        return None
    return labels, feats


def _flagged_rows(rows: _Rows, layout: Layout) -> np.ndarray:
    """Indices of rows with a NaN/inf, an out-of-range feature or a bad label, ascending."""
    labels, feats = rows
    s = layout.schema
    lo, hi = np.float32(s.min_value), np.float32(s.max_value)
    bad = None
    if feats.size and not (feats.min() >= lo and feats.max() <= hi):  # NaN fails both
        bad = ~((feats >= lo) & (feats <= hi)).all(axis=1)
    if labels is not None:
        ok = (labels >= 0) & (labels < s.num_classes) & (labels == np.floor(labels))
        if not ok.all():
            bad = ~ok if bad is None else bad | ~ok
    return np.zeros(0, dtype=np.int64) if bad is None else np.flatnonzero(bad)


class _LineOffsets:
    """Physical lines of a block by index (only used on the error path)."""

    def __init__(self, data: bytes):
        self.data = data
        self.ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)

    def line(self, k: int) -> bytes:
        start = 0 if k == 0 else int(self.ends[k - 1]) + 1
        return self.data[start : int(self.ends[k])]


def _exact_rows(data: bytes, first_line: int, layout: Layout) -> _Rows:
    """The reference parser: every line through the exact rules; raises at the first error."""
    labels: list[float] = []
    feats: list[list[float]] = []
    lines = data.split(b"\n")
    lines.pop()  # data ends with "\n"
    for k, line in enumerate(lines):
        label, values = _parse_line(line, first_line + k, layout)
        labels.append(label)
        feats.append(values)
    f = np.array(feats, dtype=np.float32).reshape(len(feats), len(layout.feature_idx))
    return (None if layout.label_idx is None else np.array(labels, dtype=np.float64)), f


def _parse_line(line: bytes, line_no: int, layout: Layout) -> tuple[float, list[float]]:
    """Apply the exact rules to one physical line: return (label, features) or raise."""
    text = line.decode("utf-8", errors="replace")
    file, s = layout.file, layout.schema
    cells, clean = _line_cells(text, line_no, layout)
    lo, hi = np.float32(s.min_value), np.float32(s.max_value)
    if clean:  # plain numbers only: one quick pass, then the per-cell rules if anything is off
        try:
            values = [float(cells[j]) for j in layout.feature_idx]
            label = float(cells[layout.label_idx]) if layout.label_idx is not None else 0.0
        except ValueError:
            pass
        else:
            f32 = np.array(values, dtype=np.float32)
            if (
                (not f32.size or (f32.min() >= lo and f32.max() <= hi))
                and 0 <= label < s.num_classes
                and label == math.floor(label)
            ):
                return label, values
    label = 0.0
    values = []
    for j, cell in enumerate(cells):
        if j == layout.skip_idx:
            continue
        v = _cell_value(cell, line_no, j, layout)
        if j == layout.label_idx:
            if not (0 <= v < s.num_classes and v == math.floor(v)):
                raise DataError(
                    "label-range",
                    f"label {_show(cell)} is not an integer in 0–{s.num_classes - 1}",
                    file=file,
                    line=line_no,
                    **layout.column(j),
                )
            label = v
        else:
            v32 = np.float32(v)
            if not (lo <= v32 <= hi):
                raise DataError(
                    "pixel-range",
                    f"value {_show(cell)} is outside {_num(s.min_value)}–{_num(s.max_value)}",
                    file=file,
                    line=line_no,
                    **layout.column(j),
                )
            values.append(v)
    return label, values


def _line_cells(text: str, line_no: int, layout: Layout) -> tuple[list[str], bool]:
    """The cells of one data line by the row rules (not blank, as many cells as the header),
    and whether the line is plain: then a cell that float() takes is a number by the rules."""
    d = layout.schema.delimiter
    if not text.strip():
        raise DataError(
            "column-count",
            f"the line is blank; expected {layout.ncols} cells as in the header (blank lines "
            "are only allowed at the end of the file)",
            file=layout.file,
            line=line_no,
        )
    clean = layout.clean_re.fullmatch(text) is not None
    cells = text.split(d) if clean else split_csv_line(text, d)
    if len(cells) != layout.ncols:
        hint = ""
        if len(cells) == 1:
            others = [c for c in (",", ";", "\t", "|") if c != d and c in text]
            if others:
                hint = f" (the line seems to be separated by {delimiter_name(others[0])})"
        raise DataError(
            "column-count",
            f"expected {layout.ncols} cells as in the header, found {len(cells)}{hint}",
            file=layout.file,
            line=line_no,
        )
    return cells, clean


def _cell_value(cell: str, line_no: int, j: int, layout: Layout) -> float:
    s = cell.strip()
    where = {"file": layout.file, "line": line_no, **layout.column(j)}
    if not s:
        raise DataError("nan", "empty cell: every cell needs a number", **where)
    low = s.lower()
    if low in _NA_STRINGS:
        raise DataError(
            "nan", f"value {_show(cell)} is a missing value: every cell needs a number", **where
        )
    if low in _INF_STRINGS:
        raise DataError("nan", f"value {_show(cell)} is not finite", **where)
    if not NUMBER_RE.fullmatch(s):
        if j == layout.label_idx:
            raise DataError(
                "label-range",
                f"label {_show(cell)} is not a class number: labels are integers "
                f"0–{layout.schema.num_classes - 1} (map class names to numbers first, "
                "docs/data-format.md section 8.2)",
                **where,
            )
        raise DataError("non-numeric", f"value {_show(cell)} is not a number", **where)
    return float(s)  # may be inf for e.g. 1e400: then out of range


def _show(cell: str) -> str:
    s = cell.strip()
    if NUMBER_RE.fullmatch(s):
        return s
    return repr(s if len(s) <= 40 else s[:37] + "...")


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) else f"{v:g}"


# --------------------------------------------------------------------------------------------
# The label column alone: splitting a dataset, and prediction input's labels


def class_labels(csv_file: CsvFile, layout: Layout) -> np.ndarray:
    """The label of each data line (``csv_file.lines``), an integer of any value (int64), for
    splitting a dataset.

    Only the label column is read, by the row and cell rules and with their errors; the rest of
    each line is not looked at (each member's check reads it).
    """
    col = layout.label_idx
    d = layout.schema.delimiter.encode()
    lines = csv_file.lines
    # The usual file: no quotes (a line's cells are its plain split) and plain labels: read in
    # bulk, as fast as a split can be.
    if b'"' not in csv_file.data:
        with contextlib.suppress(IndexError):  # a line without a label cell: see below
            cells = [line.split(d, col + 1)[col] for line in lines]
            if all(_is_plain_label(cell) for cell in cells):
                return np.array([int(cell) for cell in cells], dtype=np.int64)
    labels = [_class_label(line, k + 2, layout) for k, line in enumerate(lines)]
    return np.array(labels, dtype=np.int64)


def _is_plain_label(cell: bytes) -> bool:
    """A few ASCII digits: an integer by every rule (and within int64)."""
    return cell.isdigit() and len(cell) < 16


def _class_label(line: bytes, line_no: int, layout: Layout) -> int:
    col = layout.label_idx
    d = layout.schema.delimiter
    if b'"' not in line:
        cells = line.split(d.encode(), col + 1)
        if len(cells) > col and _is_plain_label(cells[col]):
            return int(cells[col])
    cells, _ = _line_cells(line.decode("utf-8", errors="replace"), line_no, layout)
    v = _cell_value(cells[col], line_no, col, layout)
    if not (abs(v) < 2**53 and v == math.floor(v)):  # 2**53: a float holds the integer exactly
        raise DataError(
            "label-range",
            f"label {_show(cells[col])} is not an integer",
            file=layout.file,
            line=line_no,
            **layout.column(col),
        )
    return int(v)


def _unchecked_labels(csv_file: CsvFile, layout: Layout) -> np.ndarray:
    """The label column of prediction input as float64, NaN where a cell is not a number. The
    lines have passed the row rules already (the features were parsed)."""
    col = layout.skip_idx
    d = layout.schema.delimiter
    values = []
    for line in csv_file.lines:
        if b'"' in line:
            cell = split_csv_line(line.decode("utf-8", errors="replace"), d)[col]
        else:
            cell = line.split(d.encode(), col + 1)[col].decode("utf-8", errors="replace")
        s = cell.strip()
        values.append(float(s) if NUMBER_RE.fullmatch(s) else math.nan)
    return np.array(values, dtype=np.float64)
