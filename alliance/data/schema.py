"""DataSchema: what a member's CSV files look like (default: mnist-in-csv)."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alliance.data.errors import DataError

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


def coerce_schema(schema: DataSchema | Mapping | None) -> DataSchema:
    """The public functions take a DataSchema, a mapping of its fields or None (the default)."""
    if schema is None:
        return DataSchema()
    if isinstance(schema, DataSchema):
        return schema
    return DataSchema.from_dict(schema)
