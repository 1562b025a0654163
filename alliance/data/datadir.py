"""A member's data directory: ``train.csv`` and optionally ``test.csv`` (either may be gzipped:
``train.csv.gz``), loaded through the parse cache and validated as a whole."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alliance.data.cache import load_parsed
from alliance.data.errors import DataError
from alliance.data.schema import DataSchema, coerce_schema

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclass
class Dataset:
    """Parsed data of one file. The arrays are read-only: they are shared with the cache."""

    x: np.ndarray = field(repr=False)  # float32, shape (n, *feature_shape), scaled
    y: np.ndarray = field(repr=False)  # int64, shape (n,)
    path: Path

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DataSummary:
    """What :func:`validate_data_dir` found."""

    train_rows: int
    test_rows: int  # 0 when there is no test file
    label_counts: dict[int, int]  # of train, every class 0..num_classes-1 (zeros included)
    files: dict[str, str]  # split -> path, as given
    # Data that is valid but likely not what was meant (one label only): for people to read.
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {
            "trainRows": self.train_rows,
            "testRows": self.test_rows,
            "labelCounts": {str(k): int(v) for k, v in sorted(self.label_counts.items())},
            "files": dict(self.files),
        }
        if self.warnings:
            d["warnings"] = list(self.warnings)
        return d


def find_data_file(data_dir: str | os.PathLike, split: str) -> Path:
    """``DIR/{split}.csv`` if it exists, else ``DIR/{split}.csv.gz``; else ``missing-file``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    d = Path(data_dir)
    plain, gz = d / f"{split}.csv", d / f"{split}.csv.gz"
    if not d.exists():
        raise DataError("missing-file", f"the data directory {d} does not exist", file=str(plain))
    if not d.is_dir():
        raise DataError("missing-file", f"{d} is not a directory", file=str(plain))
    for candidate in (plain, gz):
        if candidate.is_file():
            if candidate is plain and gz.is_file():
                log.warning("%s and %s both exist; using %s", plain, gz, plain)
            return candidate
    raise DataError(
        "missing-file",
        f"no {split}.csv or {split}.csv.gz in {d}"
        + (" (the training data is required)" if split == "train" else ""),
        file=str(plain),
    )


def load_split(
    data_dir: str | os.PathLike,
    split: str,
    schema: DataSchema | Mapping | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Validate and parse ``DIR/{split}.csv(.gz)``; cached in-process and on disk."""
    schema = coerce_schema(schema)
    path = find_data_file(data_dir, split)
    x, y = load_parsed(path, schema, cache_dir)
    return Dataset(x=x, y=y, path=path)


def validate_data_dir(
    data_dir: str | os.PathLike,
    schema: DataSchema | Mapping | None = None,
    require_test: bool = False,
    cache_dir: str | os.PathLike | None = None,
    require_train: bool = True,
) -> DataSummary:
    """Validate ``train`` (required unless ``require_train`` is False: a validator that only
    scores models has only ``test``) and ``test`` (if present, or if ``require_test``).

    Besides the rules of each line, each file is checked as a whole (:func:`check_content`):
    data that parses but cannot be meant (all zeros, one row repeated, values scaled twice) is
    a :class:`DataError`; data that is valid but likely a mistake (one label only) is a
    warning, in ``DataSummary.warnings`` and the log.

    The files are loaded through the cache, so a later :func:`load_split` costs nothing.
    """
    schema = coerce_schema(schema)
    files: dict[str, str] = {}
    warnings: list[str] = []
    labels = np.zeros(0, dtype=np.int64)
    if require_train:
        train = load_split(data_dir, "train", schema, cache_dir)
        files["train"] = str(train.path)
        warnings += check_content(train, schema, "train")
        labels = train.y
    test_rows = 0
    try:
        test_path = find_data_file(data_dir, "test")
    except DataError:
        if require_test:
            raise
    else:
        test = load_split(data_dir, "test", schema, cache_dir)
        files["test"] = str(test_path)
        warnings += check_content(test, schema, "test")
        test_rows = len(test)
    counts = np.bincount(labels, minlength=schema.num_classes)
    return DataSummary(
        train_rows=len(labels),
        test_rows=test_rows,
        label_counts={i: int(c) for i, c in enumerate(counts)},
        files=files,
        warnings=warnings,
    )


def check_content(ds: Dataset, schema: DataSchema, split: str = "train") -> list[str]:
    """Check a parsed file as a whole: raise :class:`DataError` (rules ``all-zero``,
    ``constant-features``, ``prescaled``, in that order) for features that parse but carry
    nothing to learn or were scaled twice; return warnings (one label only).

    Two column-wise reductions over the features (tens of milliseconds for 60,000 MNIST
    rows), then work on one row of per-column minima and maxima.
    """
    file = str(ds.path)
    n = len(ds)
    if n == 0:
        return []
    flat = ds.x.reshape(n, -1)
    col_min, col_max = flat.min(axis=0), flat.max(axis=0)
    lo, hi = col_min.min(), col_max.max()  # float32, scaled
    cells = f"{_count(n, 'row')} × {_count(flat.shape[1], 'column')}"
    if lo == 0 and hi == 0:
        raise DataError(
            "all-zero",
            f"every feature value is 0 ({cells}): there is nothing to learn from; "
            "check how the file was exported",
            file=file,
        )
    if n > 1 and np.array_equal(col_min, col_max):
        raise DataError(
            "constant-features",
            f"all {n} rows have the same {flat.shape[1]} feature values: the features cannot "
            "tell the classes apart; check how the file was exported (one row repeated?)",
            file=file,
        )
    # A raw value of 1, divided as the parser divides (float32): exact, no tolerance needed.
    scale = np.float32(schema.scale)
    if schema.max_value > 1 and schema.scale > 1 and lo >= 0 and hi <= np.float32(1) / scale:
        largest = float(f"{float(hi * scale):.6g}")
        lo_v, hi_v = _num(schema.min_value), _num(schema.max_value)
        raise DataError(
            "prescaled",
            f"every feature value is within 0–1 (the largest is {_num(largest)}): the values "
            f"look scaled already, but the schema expects {lo_v}–{hi_v} and divides them by "
            f"{_num(schema.scale)}; write the raw values ({lo_v}–{hi_v}), or set maxValue: 1 "
            "and scale: 1 in the schema",
            file=file,
        )

    warnings = []
    present = np.flatnonzero(np.bincount(ds.y, minlength=schema.num_classes))
    if n > 1 and len(present) == 1:
        effect = (
            "this member's updates pull the model toward one class"
            if split == "train"
            else "the accuracy it reports measures that one class only"
        )
        # Which label is not said: the warning travels in the heartbeat, which the other
        # members can read (the member sees its labels with `alliance check-data`).
        warnings.append(f"{file} has one label only (all {n} rows are one class): {effect}")
    return warnings


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) else f"{v:g}"
