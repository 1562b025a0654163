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

    def to_dict(self) -> dict:
        return {
            "trainRows": self.train_rows,
            "testRows": self.test_rows,
            "labelCounts": {str(k): int(v) for k, v in sorted(self.label_counts.items())},
            "files": dict(self.files),
        }


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

    The files are loaded through the cache, so a later :func:`load_split` costs nothing.
    """
    schema = coerce_schema(schema)
    files: dict[str, str] = {}
    labels = np.zeros(0, dtype=np.int64)
    if require_train:
        train = load_split(data_dir, "train", schema, cache_dir)
        files["train"] = str(train.path)
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
        test_rows = len(test)
    counts = np.bincount(labels, minlength=schema.num_classes)
    return DataSummary(
        train_rows=len(labels),
        test_rows=test_rows,
        label_counts={i: int(c) for i, c in enumerate(counts)},
        files=files,
    )
