"""DataError: every data or schema problem, with a stable rule name and its place in the file."""

from __future__ import annotations

#: Every ``DataError.rule``, in the order the checks run (header first, then the rows, then
#: the file as a whole).
RULES = (
    "schema",  # the schema itself (fields, types, values)
    "missing-file",  # data directory or train.csv / test.csv (.gz) not found
    "unreadable-file",  # the file exists but cannot be read (permissions, is a directory)
    "encoding",  # not UTF-8 (or ASCII): UTF-16, Latin-1, ...
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
    # The whole file, once it is parsed:
    "all-zero",  # every feature value is 0
    "constant-features",  # every row has the same feature values
    "prescaled",  # values within 0..1 while the schema expects a wider range and divides
)


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
