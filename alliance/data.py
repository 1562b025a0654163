"""A member's local data: CSV files, their schema, validation with exact errors, and a cache.

A member's data directory holds ``train.csv`` and optionally ``test.csv`` (either may be
gzipped: ``train.csv.gz``). The default schema is mnist-in-csv: a header
``label,1x1,1x2,...,28x28`` and one row per image (see ``docs/data-format.md``).

Parsing is fast and exact at the same time:

- the fast path is one ``pandas.read_csv`` pass (C engine, float dtypes, read in chunks into
  preallocated arrays) followed by vectorised numpy checks (finite, value ranges, integer
  labels); a flagged row maps back to its physical line, and that one line is re-checked by
  the exact rules to build the error;
- when pandas cannot parse the file (a row with extra cells, a non-numeric cell, bad UTF-8, ...)
  the file is parsed again in line-aligned blocks, and the first block pandas rejects is scanned
  line by line with the exact rules (``csv`` module), which find the first bad line and cell.

Every problem becomes a :class:`DataError` with a stable ``rule`` name, the file, the 1-based
physical line (the header is line 1) and the column (header name and 1-based index). Parsed
arrays are memoised in-process and cached on disk as ``.npy``/``.npz`` (keyed by the file's
resolved path, size, mtime and the schema's fingerprint), so a second load is almost free.
Nothing here imports TensorFlow, kopf or kubernetes.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import logging
import math
import numbers
import os
import re
import tempfile
import threading
import time
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "RULES",
    "SPLITS",
    "DataError",
    "DataSchema",
    "DataSummary",
    "Dataset",
    "clear_memory_cache",
    "default_cache_dir",
    "find_data_file",
    "load_split",
    "read_features_csv",
    "validate_data_dir",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "test")

#: Every ``DataError.rule``, in the order the checks run (header first, then the rows).
RULES = (
    "schema",  # the schema itself (fields, types, values)
    "missing-file",  # data directory or train.csv / test.csv (.gz) not found
    "unreadable-file",  # the file exists but cannot be read (permissions, is a directory)
    "bad-gzip",  # a .gz file that is not gzip, or is corrupt / truncated
    "empty-file",  # 0 bytes, or a header with no data rows
    "wrong-delimiter",  # the header is one column but contains ';', tab or '|'
    "missing-label-column",  # the header lacks schema.label_column
    "duplicate-column",  # a column name appears twice in the header
    "column-count",  # header vs schema, or a row vs the header
    "column-order",  # RxC pixel names not in row-major order
    "non-numeric",  # a cell that is not a number
    "nan",  # an empty cell, or NaN / NA / inf
    "label-range",  # a label that is not an integer in 0..num_classes-1
    "pixel-range",  # a feature value outside [min_value, max_value]
)

_CACHE_VERSION = "1"
_BLOCK_BYTES = 4 << 20  # block size for the error-locating pass
_CHUNK_CELLS = 8_000_000  # cells per pandas chunk
_MEMO_ENTRIES = 8
_ENV_CACHE_DIR = "ALLIANCE_CACHE_DIR"

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
# A number: what pandas' C parser and Python's float() both accept, minus underscores, non-ASCII
# digits and the nan / inf words (handled by the "nan" rule).
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_PIXEL_NAME_RE = re.compile(r"(\d+)x(\d+)", re.ASCII)
_PLAIN_BYTES = b'0123456789.+-eE \t\n"'  # all that plain numeric CSV is made of


# --------------------------------------------------------------------------------------------
# Errors


class DataError(ValueError):
    """A data or schema problem, located as exactly as possible.

    ``rule`` is a stable name from :data:`RULES`; ``file`` is the path as the caller gave it;
    ``line`` is the 1-based physical line in the (decompressed) file, the header being line 1;
    ``column`` is the header name of the offending column (or its index when the name is
    unknown) and ``column_index`` its 1-based position.
    """

    def __init__(
        self,
        rule: str,
        message: str,
        file: str | None = None,
        line: int | None = None,
        column: str | int | None = None,
        column_index: int | None = None,
    ):
        self.rule = rule
        self.message = message
        self.file = None if file is None else str(file)
        self.line = line
        self.column = column
        self.column_index = column_index
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.line is not None:
            where.append(f"line {self.line}")
        if isinstance(self.column, str):
            col = f"column '{self.column}'"
            if self.column_index is not None:
                col += f" (col {self.column_index})"
            where.append(col)
        elif self.column is not None:
            where.append(f"column {self.column}")
        elif self.column_index is not None:
            where.append(f"column {self.column_index}")
        prefix = ", ".join(where)
        return (
            f"{prefix}: {self.rule}: {self.message}" if prefix else f"{self.rule}: {self.message}"
        )

    def __str__(self) -> str:
        return self._format()

    def __reduce__(self):  # picklable (e.g. across process pools)
        return (
            type(self),
            (self.rule, self.message, self.file, self.line, self.column, self.column_index),
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict for status reports."""
        return {
            "rule": self.rule,
            "message": self.message,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "columnIndex": self.column_index,
        }


# --------------------------------------------------------------------------------------------
# Schema

_FIELDS = (
    ("labelColumn", "label_column"),
    ("featureShape", "feature_shape"),
    ("numClasses", "num_classes"),
    ("minValue", "min_value"),
    ("maxValue", "max_value"),
    ("scale", "scale"),
    ("delimiter", "delimiter"),
)
_CAMEL_TO_SNAKE = dict(_FIELDS)
_SNAKE_TO_CAMEL = {snake: camel for camel, snake in _FIELDS}
_F32_MAX = float(np.finfo(np.float32).max)
_BAD_DELIMITERS = set('"\r\n0123456789.+-eE')


def _schema_error(field_name: str, problem: str, value: Any) -> DataError:
    return DataError("schema", f"{field_name} {problem}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class DataSchema:
    """What a member's CSV files look like. The default is mnist-in-csv."""

    label_column: str = "label"
    # Features are reshaped to this (row-major); its product is the number of feature columns.
    feature_shape: tuple[int, ...] = (28, 28, 1)
    num_classes: int = 10  # labels must be integers 0..num_classes-1
    min_value: float = 0.0  # every feature cell must be within [min_value, max_value]
    max_value: float = 255.0
    scale: float = 255.0  # features are divided by this -> float32
    delimiter: str = ","

    def __post_init__(self) -> None:
        if not isinstance(self.label_column, str) or not self.label_column.strip():
            raise _schema_error("labelColumn", "must be a non-empty string", self.label_column)
        object.__setattr__(self, "label_column", self.label_column.strip())

        shape = self.feature_shape
        if _is_int(shape):
            shape = (shape,)
        if (
            not isinstance(shape, (list, tuple))
            or not shape
            or not all(_is_int(d) and d >= 1 for d in shape)
        ):
            raise _schema_error(
                "featureShape", "must be a non-empty list of positive integers", self.feature_shape
            )
        object.__setattr__(self, "feature_shape", tuple(int(d) for d in shape))

        if not _is_int(self.num_classes) or self.num_classes < 2:
            raise _schema_error("numClasses", "must be an integer >= 2", self.num_classes)
        object.__setattr__(self, "num_classes", int(self.num_classes))

        for camel, snake in (("minValue", "min_value"), ("maxValue", "max_value")):
            v = getattr(self, snake)
            if not _is_real(v) or not math.isfinite(v) or abs(v) > _F32_MAX:
                raise _schema_error(camel, "must be a finite number", v)
            object.__setattr__(self, snake, float(v))
        if self.min_value > self.max_value:
            raise DataError(
                "schema",
                f"minValue ({self.min_value:g}) must not be greater than maxValue "
                f"({self.max_value:g})",
            )
        if not _is_real(self.scale) or not math.isfinite(self.scale) or self.scale <= 0:
            raise _schema_error("scale", "must be a positive number", self.scale)
        object.__setattr__(self, "scale", float(self.scale))

        d = self.delimiter
        if not isinstance(d, str) or len(d) != 1 or d in _BAD_DELIMITERS:
            raise _schema_error(
                "delimiter", "must be one character (not a quote, digit, sign, '.' or 'e')", d
            )

    # --- conversions ----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping | None) -> DataSchema:
        """Build from camelCase (``labelColumn``) or snake_case (``label_column``) keys.

        ``None`` or an empty mapping gives the default schema. Unknown keys and values of the
        wrong type raise :class:`DataError` (rule ``schema``) naming the field.
        """
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise DataError(
                "schema", f"a data schema must be a mapping of fields, got {type(d).__name__}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            snake = _CAMEL_TO_SNAKE.get(key) if isinstance(key, str) else None
            if snake is None and isinstance(key, str) and key in _SNAKE_TO_CAMEL:
                snake = key
            if snake is None:
                known = ", ".join(camel for camel, _ in _FIELDS)
                raise DataError("schema", f"unknown field {key!r} (known fields: {known})")
            if snake in kwargs:
                raise DataError(
                    "schema", f"field {_SNAKE_TO_CAMEL[snake]!r} is given twice ({key!r})"
                )
            if value is None:
                raise DataError("schema", f"{_SNAKE_TO_CAMEL[snake]} has no value (null)")
            kwargs[snake] = value
        if "feature_shape" in kwargs and isinstance(kwargs["feature_shape"], list):
            kwargs["feature_shape"] = tuple(kwargs["feature_shape"])
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """camelCase keys, JSON/YAML-ready (the form of a Member's ``spec.dataSchema``)."""
        return {
            "labelColumn": self.label_column,
            "featureShape": list(self.feature_shape),
            "numClasses": self.num_classes,
            "minValue": self.min_value,
            "maxValue": self.max_value,
            "scale": self.scale,
            "delimiter": self.delimiter,
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> DataSchema:
        """Read a schema from a YAML or JSON file.

        The file holds the fields at the top level, or under a single ``dataSchema`` key (as in
        a Member resource's spec). Errors name the file.
        """
        import yaml

        name = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError("schema", "schema file not found", file=name) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError("schema", f"cannot read the schema file: {exc}", file=name) from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc)
            raise DataError(
                "schema",
                f"not valid YAML or JSON: {problem}",
                file=name,
                line=None if mark is None else mark.line + 1,
            ) from None
        if isinstance(doc, Mapping) and list(doc) == ["dataSchema"]:
            doc = doc["dataSchema"]
        try:
            return cls.from_dict(doc)
        except DataError as exc:
            raise DataError(exc.rule, exc.message, file=name) from None

    def fingerprint(self) -> str:
        """A short stable hash of every field (cache keys, logs)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # --- helpers --------------------------------------------------------------------------

    @property
    def feature_count(self) -> int:
        """The number of feature columns: the product of ``feature_shape``."""
        return math.prod(self.feature_shape)

    def column_names(self) -> list[str]:
        """The recommended header: the label column, then ``RxC`` names (1-based, row-major)
        for image shapes ``(R, C)`` / ``(R, C, 1)``, else ``f1..fN``."""
        shape = self.feature_shape
        if len(shape) in (2, 3) and (len(shape) == 2 or shape[2] == 1):
            rows, cols = shape[0], shape[1]
            feats = [f"{r}x{c}" for r in range(1, rows + 1) for c in range(1, cols + 1)]
        else:
            feats = [f"f{i}" for i in range(1, self.feature_count + 1)]
        return [self.label_column, *feats]


def _coerce_schema(schema: DataSchema | Mapping | None) -> DataSchema:
    if schema is None:
        return DataSchema()
    if isinstance(schema, DataSchema):
        return schema
    return DataSchema.from_dict(schema)


# --------------------------------------------------------------------------------------------
# Results


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


# --------------------------------------------------------------------------------------------
# Public functions


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
    schema = _coerce_schema(schema)
    path = find_data_file(data_dir, split)
    x, y = _load_cached(path, schema, "labelled", cache_dir)
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
    schema = _coerce_schema(schema)
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


def read_features_csv(
    path: str | os.PathLike, schema: DataSchema | Mapping | None = None
) -> np.ndarray:
    """Features of a CSV for prediction: ``x`` of shape ``(n, *feature_shape)``, float32, scaled.

    The label column is optional; when present its values are ignored. The feature cells are
    checked by the same rules (and give the same errors) as :func:`load_split`. Not cached.
    """
    schema = _coerce_schema(schema)
    p = Path(path)
    if not p.exists():
        raise DataError("missing-file", f"{p} does not exist", file=str(path))
    x, _ = _parse_file(p, str(path), schema, "features")
    return x


def default_cache_dir() -> Path | None:
    """``$ALLIANCE_CACHE_DIR``, else ``~/.cache/alliance/data`` (None if there is no home)."""
    env = os.environ.get(_ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    try:
        return Path.home() / ".cache" / "alliance" / "data"
    except (RuntimeError, KeyError):
        return None


def clear_memory_cache() -> None:
    """Forget the in-process memo (the disk cache stays)."""
    with _MEMO_LOCK:
        _MEMO.clear()


# --------------------------------------------------------------------------------------------
# Cache

# key -> (file state, (x, y) or the DataError the unchanged file gives)
_MEMO: OrderedDict[tuple, tuple[tuple, Any]] = OrderedDict()
_MEMO_LOCK = threading.Lock()


def _load_cached(
    path: Path, schema: DataSchema, mode: str, cache_dir: str | os.PathLike | None
) -> tuple[np.ndarray, np.ndarray]:
    display = str(path)
    try:
        resolved = path.resolve()
        st = resolved.stat()
    except OSError as exc:
        raise DataError("unreadable-file", f"cannot read the file: {exc}", file=display) from None
    state = (st.st_size, st.st_mtime_ns)
    key = (str(resolved), schema.fingerprint(), mode)

    with _MEMO_LOCK:
        hit = _MEMO.get(key)
        if hit is not None and hit[0] == state:
            _MEMO.move_to_end(key)
        else:
            hit = None
    if hit is not None:
        result = hit[1]
        if isinstance(result, DataError):  # the same unchanged file: the same error, at once
            raise DataError(
                result.rule,
                result.message,
                display,
                result.line,
                result.column,
                result.column_index,
            )
        return result

    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    prefix = _digest(_CACHE_VERSION, *key)[:20]
    stem = None if cdir is None else cdir / f"{prefix}-{_digest(*state)[:12]}"
    meta = json.dumps(
        {"path": key[0], "size": state[0], "mtimeNs": state[1], "schema": key[1], "mode": mode},
        sort_keys=True,
    )
    arrays = _read_cache(stem, meta, schema) if stem is not None else None
    if arrays is None:
        started = time.perf_counter()
        try:
            arrays = _parse_file(path, display, schema, mode)
        except DataError as exc:
            if _unchanged(resolved, state):
                _remember(key, state, exc)
            raise
        log.info(
            "parsed %s: %d rows in %.2f s", display, len(arrays[1]), time.perf_counter() - started
        )
        if stem is not None and _unchanged(resolved, state):
            _write_cache(stem, prefix, meta, *arrays)
    x, y = arrays
    x.flags.writeable = False
    y.flags.writeable = False
    _remember(key, state, (x, y))
    return x, y


def _unchanged(resolved: Path, state: tuple[int, int]) -> bool:
    """The file was not rewritten while it was parsed."""
    try:
        after = resolved.stat()
    except OSError:
        return False
    return (after.st_size, after.st_mtime_ns) == state


def _remember(key: tuple, state: tuple[int, int], result: tuple | DataError) -> None:
    with _MEMO_LOCK:
        _MEMO[key] = (state, result)
        _MEMO.move_to_end(key)
        while len(_MEMO) > _MEMO_ENTRIES:
            _MEMO.popitem(last=False)


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()


def _read_cache(stem: Path, meta: str, schema: DataSchema) -> tuple[np.ndarray, np.ndarray] | None:
    """``stem.npz`` (labels and the key, written last) and ``stem.x.npy`` (the features)."""
    try:
        with np.load(stem.with_suffix(".npz"), allow_pickle=False) as npz:
            if str(npz["meta"]) != meta:
                return None
            y = npz["y"]
        x = np.load(stem.with_suffix(".x.npy"), allow_pickle=False)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a corrupt or foreign file: parse again and overwrite it
        log.warning("ignoring unreadable cache file %s: %s", stem, exc)
        return None
    if (
        x.dtype != np.float32
        or y.dtype != np.int64
        or x.shape[1:] != schema.feature_shape
        or y.shape != (x.shape[0],)
    ):
        return None
    log.debug("cache hit: %s", stem)
    return x, y


def _write_cache(stem: Path, prefix: str, meta: str, x: np.ndarray, y: np.ndarray) -> None:
    cdir = stem.parent
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        # The features first, the small file with the key last: a reader needs both.
        _atomic_write(stem.with_suffix(".x.npy"), lambda f: np.save(f, x, allow_pickle=False))
        _atomic_write(stem.with_suffix(".npz"), lambda f: np.savez(f, y=y, meta=np.array(meta)))
        keep = {stem.with_suffix(".x.npy").name, stem.with_suffix(".npz").name}
        for old in cdir.glob(f"{prefix}-*"):  # older versions of the same file
            if old.name not in keep and not old.name.startswith("."):
                old.unlink(missing_ok=True)
    except OSError as exc:
        log.info("not caching parsed data in %s: %s", cdir, exc)


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Reading and the header


@dataclass(frozen=True)
class _Layout:
    file: str
    schema: DataSchema
    ncols: int
    names: tuple[str, ...]
    label_idx: int | None  # the label column, validated (labelled mode)
    skip_idx: int | None  # a column whose values are ignored (the label, in features mode)
    feature_idx: tuple[int, ...]
    clean_re: re.Pattern

    def column(self, j: int) -> dict:
        return {"column": self.names[j], "column_index": j + 1}


def _read_bytes(path: Path, display: str) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("missing-file", "the file does not exist", file=display) from None
    except OSError as exc:
        raise DataError(
            "unreadable-file", f"cannot read the file: {exc.strerror or exc}", file=display
        ) from None
    if not raw:
        raise DataError("empty-file", "the file is empty (0 bytes)", file=display)
    is_gz = path.name.lower().endswith(".gz")
    if raw[:2] != b"\x1f\x8b":
        if is_gz:
            raise DataError(
                "bad-gzip",
                "not a gzip file (it does not start with the gzip magic bytes 1f 8b); "
                f"if it is plain CSV, name it {path.name[:-3]}",
                file=display,
            )
        return raw
    try:
        data = gzip.decompress(raw)
    except EOFError:
        raise DataError(
            "bad-gzip", "the gzip data is truncated (the file was cut short)", file=display
        ) from None
    except (OSError, zlib.error) as exc:
        raise DataError("bad-gzip", f"corrupt gzip data: {exc}", file=display) from None
    if not data:
        raise DataError("empty-file", "the file is empty (0 bytes after decompression)", display)
    return data


def _delim_name(d: str) -> str:
    return {"\t": "tab ('\\t')", " ": "space (' ')"}.get(d, f"'{d}'")


def _looks_like_data(names: list[str]) -> bool:
    return all(_NUMBER_RE.fullmatch(n) for n in names)


def _csv_split(text: str, delimiter: str) -> list[str]:
    return next(csv.reader([text], delimiter=delimiter), [])


def _parse_header(header: bytes, schema: DataSchema, file: str, mode: str) -> _Layout:
    text = header.decode("utf-8", errors="replace").lstrip("\ufeff")
    d = schema.delimiter
    label = schema.label_column
    nfeat = schema.feature_count
    labelled = mode == "labelled"
    if not text.strip():
        raise DataError(
            "missing-label-column" if labelled else "column-count",
            "line 1 is blank: the first line must be the header "
            f"({','.join(schema.column_names()[:3])},...)",
            file=file,
            line=1,
        )
    names = [n.strip() for n in _csv_split(text, d)]

    if len(names) == 1:
        found = [(text.count(c), c) for c in (",", ";", "\t", "|") if c != d and c in text]
        if found:
            _, c = max(found)
            raise DataError(
                "wrong-delimiter",
                f"the header is a single column but contains {_delim_name(c)}: the file seems "
                f"to be separated by {_delim_name(c)}, but the schema expects "
                f"{_delim_name(d)}. Rewrite the file with {_delim_name(d)} or set the "
                "schema's delimiter",
                file=file,
                line=1,
            )

    hint = (
        " — the first line looks like data: the file needs a header line "
        f"({','.join(schema.column_names()[:3])},...)"
        if _looks_like_data(names)
        else ""
    )
    if labelled and label not in names:
        shown = ", ".join(f"'{n}'" for n in names[:5]) + (", ..." if len(names) > 5 else "")
        raise DataError(
            "missing-label-column",
            f"the header has no column '{label}' (it starts with {shown})"
            + (hint or "; set the schema's labelColumn if the label column has another name"),
            file=file,
            line=1,
        )

    seen: dict[str, int] = {}
    for j, n in enumerate(names):
        if n in seen:
            what = "an empty column name" if n == "" else f"the column name '{n}'"
            raise DataError(
                "duplicate-column",
                f"{what} appears twice (columns {seen[n] + 1} and {j + 1}){hint}",
                file=file,
                line=1,
                column=n,
                column_index=j + 1,
            )
        seen[n] = j

    has_label = label in seen
    expected = nfeat + (1 if has_label else 0)
    if len(names) != expected:
        shape = "×".join(map(str, schema.feature_shape))
        if has_label:
            want = f"the label column '{label}' and {nfeat} feature columns"
        else:
            want = f"{nfeat} feature columns (the label column is optional here)"
        raise DataError(
            "column-count",
            f"the header has {len(names)} columns; the schema expects {expected}: "
            f"{want} for featureShape {shape}",
            file=file,
            line=1,
        )

    label_idx = seen.get(label)
    feature_idx = tuple(j for j in range(len(names)) if j != label_idx)
    _check_pixel_order(names, feature_idx, schema, file)
    clean = "".join(sorted(set("0123456789eE.+- \t") | {d}))
    return _Layout(
        file=file,
        schema=schema,
        ncols=len(names),
        names=tuple(names),
        label_idx=label_idx if labelled else None,
        skip_idx=None if labelled else label_idx,
        feature_idx=feature_idx,
        clean_re=re.compile(f"[{re.escape(clean)}]*"),
    )


def _check_pixel_order(
    names: list[str], feature_idx: tuple[int, ...], schema: DataSchema, file: str
) -> None:
    """RxC names (0- or 1-based) must run row-major, or the images would come out scrambled."""
    shape = schema.feature_shape
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 1):
        return
    pairs = []
    for j in feature_idx:
        m = _PIXEL_NAME_RE.fullmatch(names[j])
        if m is None:
            return  # other names: no order to check
        pairs.append((int(m.group(1)), int(m.group(2))))
    base = min(pairs[0])
    cols = shape[1]
    for k, j in enumerate(feature_idx):
        want = (base + k // cols, base + k % cols)
        if pairs[k] != want:
            raise DataError(
                "column-order",
                f"pixel columns must be in row-major order (row by row, RxC = row R, column "
                f"C): expected '{want[0]}x{want[1]}' here, found '{names[j]}'",
                file=file,
                line=1,
                column=names[j],
                column_index=j + 1,
            )


def _strip_trailing_blank_lines(data: bytes) -> bytes:
    if not data.endswith(b"\n"):
        data += b"\n"
    end = len(data) - 1  # the final newline
    while end >= 0:
        start = data.rfind(b"\n", 0, end) + 1
        if data[start:end].strip():
            break
        end = start - 1
    return data[: end + 1] if end >= 0 else b""


def _parse_file(
    path: Path, display: str, schema: DataSchema, mode: str
) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path, display)
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if raw.isspace():
        raise DataError("empty-file", "the file contains only blank lines", file=display)
    cut = raw.find(b"\n")
    header, data = (raw, b"") if cut < 0 else (raw[:cut], raw[cut + 1 :])
    del raw
    layout = _parse_header(header, schema, display, mode)
    data = _strip_trailing_blank_lines(data)
    if not data:
        raise DataError(
            "empty-file", "the file has a header (line 1) but no data rows", file=display
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels, feats = _parse_rows(data, 2, layout, split=True)
    del data
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if schema.scale != 1.0:
        np.divide(feats, np.float32(schema.scale), out=feats)
    x = feats.reshape((feats.shape[0], *schema.feature_shape))
    y = labels.astype(np.int64) if labels is not None else np.zeros(0, dtype=np.int64)
    return x, y


# --------------------------------------------------------------------------------------------
# Rows: the fast path, the block pass and the exact per-line rules

_Rows = tuple["np.ndarray | None", np.ndarray]  # labels (float64) or None, features (float32)


def _parse_rows(data: bytes, first_line: int, layout: _Layout, split: bool) -> _Rows:
    """Parse data lines (each ending in '\\n') starting at physical line ``first_line``."""
    nlines = data.count(b"\n")
    # pandas reads a column that is all True/False within one of its internal chunks as 1/0:
    # data with such words goes to the exact pass.
    rows = None if _may_hold_booleans(data, layout) else _pandas_rows(data, nlines, layout)
    if rows is not None:
        # pandas silently drops extra cells on the first row: the exact check catches that.
        _parse_line(data[: data.find(b"\n")], first_line, layout)
        bad = _flagged_rows(rows, layout)
        if bad.size == 0:
            return rows
        offsets = _LineOffsets(data)
        for r in bad[:1000]:
            _parse_line(offsets.line(int(r)), first_line + int(r), layout)  # raises
        # flagged by the float32 checks but fine by the exact rules: take the exact scan
    elif split and len(data) > _BLOCK_BYTES:
        return _parse_blocks(data, first_line, layout)
    return _exact_rows(data, first_line, layout)


def _may_hold_booleans(data: bytes, layout: _Layout) -> bool:
    if b"e" not in data and b"E" not in data:  # memchr: instant on typical numeric data
        return False
    rest = data.translate(None, _PLAIN_BYTES + layout.schema.delimiter.encode())
    low = rest.lower()  # "true" / "false" without their e: "tru", "fals"
    return b"tru" in low or b"fals" in low


def _parse_blocks(data: bytes, first_line: int, layout: _Layout) -> _Rows:
    """Parse line-aligned blocks in order: the first error in the file is the one raised."""
    parts = []
    start, line = 0, first_line
    while start < len(data):
        end = data.find(b"\n", min(start + _BLOCK_BYTES, len(data)) - 1) + 1
        block = data[start:end]
        parts.append(_parse_rows(block, line, layout, split=False))
        line += block.count(b"\n")
        start = end
    labels = None if layout.label_idx is None else np.concatenate([p[0] for p in parts])
    return labels, np.concatenate([p[1] for p in parts])


def _pandas_rows(data: bytes, nlines: int, layout: _Layout) -> _Rows | None:
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


def _flagged_rows(rows: _Rows, layout: _Layout) -> np.ndarray:
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


def _exact_rows(data: bytes, first_line: int, layout: _Layout) -> _Rows:
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


def _parse_line(line: bytes, line_no: int, layout: _Layout) -> tuple[float, list[float]]:
    """Apply the exact rules to one physical line: return (label, features) or raise."""
    text = line.decode("utf-8", errors="replace")
    file, s = layout.file, layout.schema
    if not text.strip():
        raise DataError(
            "column-count",
            f"the line is blank; expected {layout.ncols} cells as in the header (blank lines "
            "are only allowed at the end of the file)",
            file=file,
            line=line_no,
        )
    clean = layout.clean_re.fullmatch(text) is not None
    cells = text.split(s.delimiter) if clean else _csv_split(text, s.delimiter)
    if len(cells) != layout.ncols:
        hint = ""
        if len(cells) == 1:
            others = [c for c in (",", ";", "\t", "|") if c != s.delimiter and c in text]
            if others:
                hint = f" (the line seems to be separated by {_delim_name(others[0])})"
        raise DataError(
            "column-count",
            f"expected {layout.ncols} cells as in the header, found {len(cells)}{hint}",
            file=file,
            line=line_no,
        )
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


def _cell_value(cell: str, line_no: int, j: int, layout: _Layout) -> float:
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
    if not _NUMBER_RE.fullmatch(s):
        raise DataError("non-numeric", f"value {_show(cell)} is not a number", **where)
    return float(s)  # may be inf for e.g. 1e400: then out of range


def _show(cell: str) -> str:
    s = cell.strip()
    if _NUMBER_RE.fullmatch(s):
        return s
    return repr(s if len(s) <= 40 else s[:37] + "...")


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) else f"{v:g}"
