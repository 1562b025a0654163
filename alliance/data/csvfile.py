"""Reading a CSV file: its text (plain or gzipped) and its header, checked against a schema.

This is the one way into a CSV file: the checks and training (``load_split``), prediction
(``read_features_csv``) and splitting a dataset among members (``split_dataset``) all start here,
so a file reads the same everywhere and a problem gets the same error. The data lines are then
read by the rules in ``alliance.data.parse``.
"""

from __future__ import annotations

import csv
import gzip
import re
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from alliance.data.errors import DataError
from alliance.data.schema import DataSchema

# A number: what pandas' C parser and Python's float() both accept, minus underscores, non-ASCII
# digits and the nan / inf words (handled by the "nan" rule).
NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_PIXEL_NAME_RE = re.compile(r"(\d+)x(\d+)", re.ASCII)


@dataclass(frozen=True)
class CsvFile:
    """A CSV file's text as the rules see it: the header line apart from the data lines."""

    file: str  # the path as the caller gave it, for error messages
    header: bytes  # line 1, without its newline
    # Lines 2.., each ending in "\n" ("\r\n" and "\r" made "\n"), trailing blank lines dropped.
    data: bytes

    def require_rows(self) -> None:
        if not self.data:
            raise DataError(
                "empty-file", "the file has a header (line 1) but no data rows", file=self.file
            )

    @cached_property
    def lines(self) -> list[bytes]:
        """The data lines without their newline: index k is physical line k + 2."""
        lines = self.data.split(b"\n")
        lines.pop()  # data ends with "\n"
        return lines


def read_csv_file(path: Path, file: str) -> CsvFile:
    """Read ``path`` (gunzipped when it starts with the gzip magic); ``file`` names it in errors."""
    raw = _read_bytes(path, file)
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if raw.isspace():
        raise DataError("empty-file", "the file contains only blank lines", file=file)
    cut = raw.find(b"\n")
    header, data = (raw, b"") if cut < 0 else (raw[:cut], raw[cut + 1 :])
    del raw  # the data is a copy: do not hold the file twice
    return CsvFile(file=file, header=header, data=_strip_trailing_blank_lines(data))


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


# --------------------------------------------------------------------------------------------
# The header


@dataclass(frozen=True)
class Layout:
    """Where the label and the features are in each line, from the header."""

    file: str
    schema: DataSchema
    ncols: int
    names: tuple[str, ...]
    label_idx: int | None  # the label column, checked by the rules (labelled files)
    # The label column of a file for prediction: optional, its values not checked.
    skip_idx: int | None
    feature_idx: tuple[int, ...]
    clean_re: re.Pattern  # a plain line: digits, signs, '.', 'e', blanks and delimiters

    @classmethod
    def of(cls, file: str, schema: DataSchema, names: list[str], labelled: bool) -> Layout:
        label_idx = names.index(schema.label_column) if schema.label_column in names else None
        clean = "".join(sorted(set("0123456789eE.+- \t") | {schema.delimiter}))
        return cls(
            file=file,
            schema=schema,
            ncols=len(names),
            names=tuple(names),
            label_idx=label_idx if labelled else None,
            skip_idx=None if labelled else label_idx,
            feature_idx=tuple(j for j in range(len(names)) if j != label_idx),
            clean_re=re.compile(f"[{re.escape(clean)}]*"),
        )

    def column(self, j: int) -> dict:
        return {"column": self.names[j], "column_index": j + 1}


def read_layout(csv_file: CsvFile, schema: DataSchema, labelled: bool) -> Layout:
    """Check the header against the schema (every header rule) and say where the columns are.

    ``labelled``: the label column is required and its values are checked (training data);
    otherwise it is optional and its values are not checked (prediction input).
    """
    file = csv_file.file
    names = header_columns(csv_file, schema, labelled)
    nfeat = schema.feature_count
    has_label = schema.label_column in names
    expected = nfeat + (1 if has_label else 0)
    if len(names) != expected:
        shape = "×".join(map(str, schema.feature_shape))
        if has_label:
            want = f"the label column '{schema.label_column}' and {nfeat} feature columns"
        else:
            want = f"{nfeat} feature columns (the label column is optional here)"
        extra = ""
        if len(names) > expected:  # name what is there: the extra one is often the last
            shown = ", ".join(f"'{n}'" for n in names[expected:][:3])
            more = "" if len(names) - expected <= 3 else ", ..."
            extra = f" (beyond the {expected} expected: {shown}{more})"
        raise DataError(
            "column-count",
            f"the header has {len(names)} columns{extra}; the schema expects {expected}: "
            f"{want} for featureShape {shape}",
            file=file,
            line=1,
        )
    layout = Layout.of(file, schema, names, labelled)
    _check_pixel_order(names, layout.feature_idx, schema, file)
    return layout


def _decoded_header(header: bytes, file: str) -> str:
    """Line 1 as text; a file in another encoding than UTF-8 (or ASCII) is refused by name,
    rather than read as garbled column names."""
    if header.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in header[:200]:
        raise DataError(
            "encoding",
            "the file is UTF-16 (it has zero bytes between the characters): save it as UTF-8 "
            "(e.g. `iconv -f UTF-16 -t UTF-8 in.csv > out.csv`)",
            file=file,
            line=1,
        )
    try:
        return header.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        bad = header[exc.start : exc.start + 1]
        raise DataError(
            "encoding",
            f"line 1 is not UTF-8 (byte 0x{bad.hex().upper()} at byte {exc.start + 1}): the file "
            "seems to be in a legacy encoding such as Latin-1 or Windows-1252; save it as UTF-8 "
            "(e.g. `iconv -f LATIN1 -t UTF-8 in.csv > out.csv`)",
            file=file,
            line=1,
        ) from None


def header_columns(csv_file: CsvFile, schema: DataSchema, labelled: bool) -> list[str]:
    """The column names of line 1, by the header rules that need no more of the schema than its
    label column and delimiter: not blank, the delimiter, the label column (when ``labelled``),
    no name twice."""
    file = csv_file.file
    text = _decoded_header(csv_file.header, file)
    d = schema.delimiter
    label = schema.label_column
    if not text.strip():
        raise DataError(
            "missing-label-column" if labelled else "column-count",
            "line 1 is blank: the first line must be the header "
            f"({','.join(schema.column_names()[:3])},...)",
            file=file,
            line=1,
        )
    names = [n.strip() for n in split_csv_line(text, d)]

    if len(names) == 1:
        found = [(text.count(c), c) for c in (",", ";", "\t", "|") if c != d and c in text]
        if found:
            _, c = max(found)
            raise DataError(
                "wrong-delimiter",
                f"the header is a single column but contains {delimiter_name(c)}: the file "
                f"seems to be separated by {delimiter_name(c)}, but the schema expects "
                f"{delimiter_name(d)}. Rewrite the file with {delimiter_name(d)} or set the "
                "schema's delimiter",
                file=file,
                line=1,
            )

    hint = (
        " — the first line looks like data: the file needs a header line "
        f"({','.join(schema.column_names()[:3])},...)"
        if all(NUMBER_RE.fullmatch(n) for n in names)
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
    return names


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
    # The origin of the whole header (not of its first name, which may be any pixel).
    base = 0 if any(0 in p for p in pairs) else 1
    rows, cols = shape[0], shape[1]
    want = [(base + k // cols, base + k % cols) for k in range(len(pairs))]
    for k, j in enumerate(feature_idx):
        if pairs[k] != want[k]:
            raise DataError(
                "column-order",
                f"pixel columns must be in row-major order (row by row, RxC = row R, column "
                f"C): expected '{want[k][0]}x{want[k][1]}' here, found '{names[j]}'"
                + _order_hint(pairs, want, base, rows, cols),
                file=file,
                line=1,
                column=names[j],
                column_index=j + 1,
            )


def _order_hint(
    pairs: list[tuple[int, int]], want: list[tuple[int, int]], base: int, rows: int, cols: int
) -> str:
    """When every pixel column is there, only in another order: say so (and how to fix it)."""
    if set(pairs) != set(want) or len(want) < 3:
        return ""

    def name(p: tuple[int, int]) -> str:
        return f"{p[0]}x{p[1]}"

    fix = f"write them row by row: {name(want[0])}, {name(want[1])}, …, {name(want[-1])}"
    by_column = [(base + k % rows, base + k // rows) for k in range(len(pairs))]
    if pairs == by_column:
        return (
            f"; all {len(pairs)} pixel columns are present, column by column "
            f"({name(by_column[0])}, {name(by_column[1])}, …): the images would come out "
            f"transposed; {fix}"
        )
    return f"; all {len(pairs)} pixel columns are present, in another order: {fix}"


def split_csv_line(text: str, delimiter: str) -> list[str]:
    """The cells of one line, quotes and all (a record is one line: no newlines in cells)."""
    return next(csv.reader([text], delimiter=delimiter), [])


def delimiter_name(d: str) -> str:
    return {"\t": "tab ('\\t')", " ": "space (' ')"}.get(d, f"'{d}'")
