"""Tests for alliance.data: one test per validation rule (exact rule, line and column), gzip, the
cache, the schema, prediction input, and a round trip on the real MNIST test file when it is
available."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alliance.data import cache, parse
from alliance.data.datadir import DataSummary, find_data_file, load_split, validate_data_dir
from alliance.data.errors import RULES, DataError
from alliance.data.parse import read_features_csv
from alliance.data.schema import DataSchema

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
TINY = DataSchema(feature_shape=(2, 2, 1))  # header: label,1x1,1x2,2x1,2x2
HEADER = ",".join(TINY.column_names())


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own disk cache and an empty in-process memo."""
    monkeypatch.setenv("ALLIANCE_CACHE_DIR", str(tmp_path / "cache"))
    cache.clear_memory_cache()
    yield
    cache.clear_memory_cache()


def write(directory: Path, name: str, text: str | bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    raw = text.encode() if isinstance(text, str) else text
    if name.endswith(".gz"):
        raw = gzip.compress(raw)
    path = directory / name
    path.write_bytes(raw)
    return path


def tiny_csv(*rows: str, header: str = HEADER) -> str:
    return "\n".join([header, *rows]) + "\n"


def error_of(text: str | bytes, schema: DataSchema = TINY, name: str = "train.csv", tmp=None):
    d = tmp / "member"
    write(d, name, text)
    with pytest.raises(DataError) as info:
        load_split(d, "train", schema)
    return info.value


def where(err: DataError) -> tuple:
    return err.rule, err.line, err.column, err.column_index


# --- valid data -----------------------------------------------------------------------------


def test_valid_tiny_file_parses_scales_and_shapes(tmp_path):
    path = write(tmp_path, "train.csv", tiny_csv("3,0,255,51,102", "0,1,2,3,4", "9,5,6,7,8"))
    ds = load_split(tmp_path, "train", TINY)
    assert ds.path == path
    assert len(ds) == 3
    assert ds.x.dtype == np.float32 and ds.x.shape == (3, 2, 2, 1)
    assert ds.y.dtype == np.int64 and ds.y.tolist() == [3, 0, 9]
    # row-major: 1x1, 1x2 / 2x1, 2x2
    np.testing.assert_allclose(ds.x[0, :, :, 0], [[0.0, 1.0], [0.2, 0.4]], rtol=1e-6)
    assert not ds.x.flags.writeable  # shared with the cache


def test_gzip_quoted_crlf_bom_label_last_and_trailing_blank_lines_are_accepted(tmp_path):
    plain = write(tmp_path / "a", "train.csv", tiny_csv("1,2,3,4,5", "6,7,8,9,0"))
    gz = write(tmp_path / "b", "train.csv.gz", tiny_csv("1,2,3,4,5", "6,7,8,9,0"))
    assert find_data_file(tmp_path / "b", "train") == gz
    a, b = load_split(plain.parent, "train", TINY), load_split(gz.parent, "train", TINY)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)

    odd = '\ufeff1x1,1x2,2x1,2x2,label\r\n"2",3, 4 ,5,1\r\n7,8.0,9,0e0,6\r\n\r\n  \r\n'
    c = load_split(write(tmp_path / "c", "train.csv", odd).parent, "train", TINY)
    assert c.y.tolist() == [1, 6]
    assert np.array_equal(c.x * 255, a.x * 255)


def test_custom_schema_delimiter_range_and_scale(tmp_path):
    schema = DataSchema(
        label_column="digit",
        feature_shape=(3,),
        num_classes=3,
        min_value=0,
        max_value=1,
        scale=1,
        delimiter=";",
    )
    write(tmp_path, "train.csv", "f1;digit;f2;f3\n0.5;2;1;0\n0;0;0.25;1e-1\n")
    ds = load_split(tmp_path, "train", schema)
    assert ds.y.tolist() == [2, 0]
    np.testing.assert_allclose(ds.x, [[0.5, 1, 0], [0, 0.25, 0.1]], rtol=1e-6)


# --- one test per rule ----------------------------------------------------------------------


def test_missing_file(tmp_path):
    (tmp_path / "member").mkdir()
    with pytest.raises(DataError) as info:
        load_split(tmp_path / "member", "train", TINY)
    err = info.value
    assert (err.rule, err.file, err.line) == (
        "missing-file",
        str(tmp_path / "member/train.csv"),
        None,
    )
    assert "train.csv or train.csv.gz" in err.message
    with pytest.raises(DataError, match="does not exist") as info:
        validate_data_dir(tmp_path / "nowhere", TINY)
    assert info.value.rule == "missing-file"


@pytest.mark.parametrize(
    ("content", "name", "fragment"),
    [
        (b"", "train.csv", "0 bytes"),
        (HEADER + "\n", "train.csv", "no data rows"),
        (HEADER + "\n\n \n", "train.csv", "no data rows"),
        (b"", "train.csv.gz", "after decompression"),
        ("\n\n", "train.csv", "only blank lines"),
    ],
)
def test_empty_file(tmp_path, content, name, fragment):
    err = error_of(content, name=name, tmp=tmp_path)
    assert (err.rule, err.line, err.column) == ("empty-file", None, None)
    assert fragment in err.message


def test_missing_label_column(tmp_path):
    err = error_of(tiny_csv("1,2,3,4,5", header="digit,1x1,1x2,2x1,2x2"), tmp=tmp_path)
    assert where(err) == ("missing-label-column", 1, None, None)
    assert "'label'" in err.message and "labelColumn" in err.message


def test_missing_header_is_reported_as_such(tmp_path):
    err = error_of("1,2,3,4,5\n6,7,8,9,0\n", tmp=tmp_path)
    assert where(err) == ("missing-label-column", 1, None, None)
    assert "looks like data" in err.message


@pytest.mark.parametrize(("sep", "shown"), [(";", "';'"), ("\t", "tab"), ("|", "'|'")])
def test_wrong_delimiter(tmp_path, sep, shown):
    text = tiny_csv("1,2,3,4,5").replace(",", sep)
    err = error_of(text, tmp=tmp_path)
    assert where(err) == ("wrong-delimiter", 1, None, None)
    assert shown in err.message and "expects ','" in err.message


def test_duplicate_column(tmp_path):
    err = error_of(tiny_csv("1,2,3,4,5", header="label,1x1,1x1,2x1,2x2"), tmp=tmp_path)
    assert where(err) == ("duplicate-column", 1, "1x1", 3)
    assert "columns 2 and 3" in err.message


def test_column_order(tmp_path):
    err = error_of(tiny_csv("1,2,3,4,5", header="label,1x1,2x1,1x2,2x2"), tmp=tmp_path)
    assert where(err) == ("column-order", 1, "2x1", 3)
    assert "expected '1x2'" in err.message
    # 0-based names and names that are not RxC are fine
    write(tmp_path / "z", "train.csv", tiny_csv("1,2,3,4,5", header="label,0x0,0x1,1x0,1x1"))
    write(tmp_path / "a", "train.csv", tiny_csv("1,2,3,4,5", header="label,a,b,c,d"))
    assert len(load_split(tmp_path / "z", "train", TINY)) == 1
    assert len(load_split(tmp_path / "a", "train", TINY)) == 1


def test_column_count_header(tmp_path):
    err = error_of(tiny_csv("1,2,3,4,5,6", header=HEADER + ",extra"), tmp=tmp_path)
    assert where(err) == ("column-count", 1, None, None)
    assert "has 6 columns (beyond the 5 expected: 'extra'); the schema expects 5" in err.message


@pytest.mark.parametrize("cell", ["x", "cat", "seven"])
def test_a_label_that_is_a_word_is_a_label_error(tmp_path, cell):
    err = error_of(tiny_csv("1,2,3,4,5", f"{cell},2,3,4,5"), tmp=tmp_path)
    assert where(err) == ("label-range", 3, "label", 1)
    assert f"label '{cell}' is not a class number: labels are integers 0–9" in err.message


@pytest.mark.parametrize(
    "encode,message",
    [
        (lambda t: t.encode("utf-16"), "the file is UTF-16"),
        (lambda t: t.encode("utf-16-be"), "the file is UTF-16"),
        (
            lambda t: t.replace("label", "labél").encode("latin-1"),
            "not UTF-8 (byte 0xE9 at byte 4)",
        ),
    ],
    ids=["utf-16", "utf-16-be-without-bom", "latin-1"],
)
def test_a_file_not_in_utf8_is_named_as_such(tmp_path, encode, message):
    for name in ("train.csv", "train.csv.gz"):
        err = error_of(encode(tiny_csv("1,2,3,4,5")), name=name, tmp=tmp_path / name)
        assert where(err) == ("encoding", 1, None, None)
        assert message in err.message and "save it as UTF-8" in err.message
    # A UTF-8 byte order mark is fine.
    write(tmp_path / "bom", "train.csv", "\ufeff" + tiny_csv("1,2,3,4,5"))
    assert len(load_split(tmp_path / "bom", "train", TINY)) == 1


@pytest.mark.parametrize(
    ("rows", "line", "found"),
    [
        (["1,2,3,4,5", "1,2,3,4", "1,2,3,4,5"], 3, "found 4"),  # too few
        (["1,2,3,4,5", "1,2,3,4,5", "1,2,3,4,5,6"], 4, "found 6"),  # too many
        (["1,2,3,4,5,6", "1,2,3,4,5"], 2, "found 6"),  # first row (pandas would drop it)
        (["1,2,3,4,5", "", "1,2,3,4,5"], 3, "blank"),  # blank line in the middle
        (["1,2,3,4,5", "   ", "1,2,3,4,5"], 3, "blank"),
        # a quoted cell over two lines: records are lines (pandas would join them)
        (["1,2,3,4,5", '1,"2\n",3,4,5', "1,2,3,4,5"], 3, "found 2"),
    ],
)
def test_column_count_rows(tmp_path, rows, line, found):
    err = error_of(tiny_csv(*rows), tmp=tmp_path)
    assert where(err) == ("column-count", line, None, None)
    assert found in err.message


@pytest.mark.parametrize(
    ("cell", "value"),
    [
        ("abc", "'abc'"),
        ("1_0", "'1_0'"),
        ("0x1F", "'0x1F'"),
        ("1.2.3", "'1.2.3'"),
        ('"7a"', "'7a'"),
    ],
)
def test_non_numeric(tmp_path, cell, value):
    err = error_of(tiny_csv("1,2,3,4,5", "1,2,3,4,5", f"1,2,3,{cell},5"), tmp=tmp_path)
    assert where(err) == ("non-numeric", 4, "2x1", 4)
    assert err.message == f"value {value} is not a number"


def test_non_numeric_boolean_column(tmp_path, monkeypatch):
    # pandas would read a column of only True/False as 1.0/0.0
    err = error_of(tiny_csv("1,True,3,4,5", "1,False,3,4,5"), tmp=tmp_path / "a")
    assert where(err) == ("non-numeric", 2, "1x1", 2)
    # ... also when that happens only inside one of pandas' chunks
    monkeypatch.setattr(parse, "_CHUNK_CELLS", 5)  # 1024-row chunks
    rows = ["1,2,3,4,5"] * 1024 + ["1,True,3,4,5", "1,false,3,4,5"] * 512
    err = error_of(tiny_csv(*rows), tmp=tmp_path / "b")
    assert where(err) == ("non-numeric", 1026, "1x1", 2)


@pytest.mark.parametrize(
    ("cell", "fragment"),
    [
        ("", "empty cell"),
        (" ", "empty cell"),
        ("NaN", "missing value"),
        ("NA", "missing value"),
        ("inf", "not finite"),
        ("-Infinity", "not finite"),
    ],
)
def test_nan(tmp_path, cell, fragment):
    err = error_of(tiny_csv("1,2,3,4,5", f"2,3,4,5,{cell}"), tmp=tmp_path)
    assert where(err) == ("nan", 3, "2x2", 5)
    assert fragment in err.message


@pytest.mark.parametrize("cell", ["256", "-1", "255.5", "1e400"])
def test_pixel_range(tmp_path, cell):
    err = error_of(tiny_csv("1,2,3,4,5", "1,2,3,4,5", "1,2,3,4,5", f"4,{cell},0,0,0"), tmp=tmp_path)
    assert where(err) == ("pixel-range", 5, "1x1", 2)
    assert err.message == f"value {cell} is outside 0–255"


@pytest.mark.parametrize("cell", ["10", "-1", "3.5", "1e400"])
def test_label_range(tmp_path, cell):
    err = error_of(tiny_csv("1,2,3,4,5", f"{cell},2,3,4,5"), tmp=tmp_path)
    assert where(err) == ("label-range", 3, "label", 1)
    assert err.message == f"label {cell} is not an integer in 0–9"


def test_label_as_integral_float_is_accepted(tmp_path):
    write(tmp_path, "train.csv", tiny_csv("3.0,2,3,4,5", "+0,1,1,1,1"))
    assert load_split(tmp_path, "train", TINY).y.tolist() == [3, 0]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"label,1x1\n1,2\n", "not a gzip file"),
        (gzip.compress(tiny_csv("1,2,3,4,5").encode())[:-12], "truncated"),
        (b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"garbage-garbage", "corrupt"),
    ],
)
def test_bad_gzip(tmp_path, content, fragment):
    d = tmp_path / "member"
    write(d, "train.csv", b"")  # train.csv is preferred: remove it to test the .gz
    (d / "train.csv").unlink()
    (d / "train.csv.gz").write_bytes(content)
    with pytest.raises(DataError) as info:
        load_split(d, "train", TINY)
    assert (info.value.rule, info.value.line, info.value.file) == (
        "bad-gzip",
        None,
        str(d / "train.csv.gz"),
    )
    assert fragment in info.value.message


def test_errors_inside_gzip_have_exact_lines(tmp_path):
    err = error_of(
        tiny_csv("1,2,3,4,5", "1,2,3,4,5", "1,2,x,4,5"), name="train.csv.gz", tmp=tmp_path
    )
    assert where(err) == ("non-numeric", 4, "1x2", 3)
    assert err.file == str(tmp_path / "member" / "train.csv.gz")


# --- the first error in file order, with default schema and exact messages --------------------


def mnist_like(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cols = DataSchema().column_names()
    values = np.column_stack([rng.integers(0, 10, n), rng.integers(0, 256, (n, 784))])
    return pd.DataFrame(values, columns=cols)


def test_default_schema_error_message_is_exact(tmp_path):
    df = mnist_like(20)
    df.loc[5, "3x4"] = 300  # line 7 (header = line 1); column 1 + 2 * 28 + 4 = 61
    d = tmp_path / "m"
    d.mkdir()
    df.to_csv(d / "train.csv", index=False)
    with pytest.raises(DataError) as info:
        load_split(d, "train")
    path = str(d / "train.csv")
    assert (
        str(info.value)
        == f"{path}, line 7, column '3x4' (col 61): pixel-range: value 300 is outside 0–255"
    )
    assert info.value.to_dict() == {
        "rule": "pixel-range",
        "message": "value 300 is outside 0–255",
        "file": path,
        "line": 7,
        "column": "3x4",
        "columnIndex": 61,
    }


@pytest.mark.parametrize("block_bytes", [None, 40_000])
def test_first_error_in_file_order_wins(tmp_path, monkeypatch, block_bytes):
    """A late tokenizing error (extra cell) must not hide an earlier bad value, and vice versa;
    also through the block-by-block pass (small blocks)."""
    if block_bytes:
        monkeypatch.setattr(parse, "_BLOCK_BYTES", block_bytes)
    rows = [",".join(["1"] * 785)] * 200
    header = ",".join(DataSchema().column_names())

    early_nan = list(rows)
    # line 152: an empty cell in column 402, i.e. pixel 401 = row 15, column 9 ("15x9")
    early_nan[150] = "1," + ",".join(["1"] * 400 + [""] + ["1"] * 383)
    early_nan[180] = rows[0] + ",9"  # line 182: extra cell (pandas refuses the file)
    err = error_of("\n".join([header, *early_nan]) + "\n", DataSchema(), tmp=tmp_path / "a")
    assert where(err) == ("nan", 152, "15x9", 402)

    early_count = list(rows)
    early_count[20] = rows[0] + ",9"  # line 22
    early_count[150] = rows[0].replace("1", "x", 1)  # line 152: non-numeric label
    err = error_of("\n".join([header, *early_count]) + "\n", DataSchema(), tmp=tmp_path / "b")
    assert where(err) == ("column-count", 22, None, None)

    late = list(rows)
    late[199] = "1," + ",".join(["1"] * 783 + ["abc"])  # line 201, last column
    err = error_of("\r\n".join([header, *late]) + "\r\n", DataSchema(), tmp=tmp_path / "c")
    assert where(err) == ("non-numeric", 201, "28x28", 785)


@pytest.mark.parametrize(
    ("row", "bad", "expected"),
    [
        (1024, "1,2,3,4,5,6", ("column-count", 1026, None, None)),  # first row of chunk 2
        (2500, "1,2,3", ("column-count", 2502, None, None)),
        (2999, "1,2,3,4,", ("nan", 3001, "2x2", 5)),  # the last line
        (2100, "1,2,3,4,x", ("non-numeric", 2102, "2x2", 5)),
    ],
)
def test_errors_across_pandas_chunks(tmp_path, monkeypatch, row, bad, expected):
    monkeypatch.setattr(parse, "_CHUNK_CELLS", 5)  # 1024-row chunks
    rows = ["1,2,3,4,5"] * 3000
    rows[row] = bad
    assert where(error_of(tiny_csv(*rows), tmp=tmp_path)) == expected
    write(tmp_path / "ok", "train.csv", tiny_csv(*["1,2,3,4,5"] * 3000))
    assert len(load_split(tmp_path / "ok", "train", TINY)) == 3000


def test_exact_pass_without_errors_returns_the_data(tmp_path, monkeypatch):
    """When pandas refuses a file whose every line is valid by the rules, the exact parser's
    result is used."""

    def refuse(*args, **kwargs):
        raise ValueError("pandas says no")

    monkeypatch.setattr(pd, "read_csv", refuse)
    write(tmp_path, "train.csv", tiny_csv("1,2,3,4,5", '2,"3",4,5,6'))
    ds = load_split(tmp_path, "train", TINY)
    assert ds.y.tolist() == [1, 2]
    assert (ds.x.reshape(2, 4) * 255).round().tolist() == [[2, 3, 4, 5], [3, 4, 5, 6]]


# --- cache ---------------------------------------------------------------------------------


class CacheMiss(BaseException):
    """Not an Exception: nothing in alliance.data may swallow it."""


def _forbid_parsing(monkeypatch):
    def forbidden(*args, **kwargs):
        raise CacheMiss("the file was read and parsed: the cache was not used")

    monkeypatch.setattr(cache, "parse_csv", forbidden)
    monkeypatch.setattr(pd, "read_csv", forbidden)


def test_cache_memo_disk_and_invalidation(tmp_path, monkeypatch):
    cache_dir = tmp_path / "mycache"
    path = write(tmp_path / "m", "train.csv", tiny_csv("1,2,3,4,5", "2,3,4,5,6"))
    first = load_split(path.parent, "train", TINY, cache_dir=cache_dir)
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".npy", ".npz"]

    with monkeypatch.context() as m:
        _forbid_parsing(m)
        memo = load_split(path.parent, "train", TINY, cache_dir=cache_dir)
        assert memo.x is first.x  # in-process memo
        cache.clear_memory_cache()
        disk = load_split(path.parent, "train", TINY, cache_dir=cache_dir)
        assert disk.x is not first.x
        assert np.array_equal(disk.x, first.x) and np.array_equal(disk.y, first.y)
        assert disk.x.shape == (2, 2, 2, 1) and disk.y.dtype == np.int64

    # a changed file (size and mtime) is parsed again, and replaces its old cache entry
    with path.open("a") as f:
        f.write("3,4,5,6,7\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    again = load_split(path.parent, "train", TINY, cache_dir=cache_dir)
    assert again.y.tolist() == [1, 2, 3]
    assert len(list(cache_dir.iterdir())) == 2

    # another schema is another cache entry
    other = DataSchema(feature_shape=(4,))
    assert load_split(path.parent, "train", other, cache_dir=cache_dir).x.shape == (3, 4)


def test_error_of_an_unchanged_file_is_remembered_until_it_changes(tmp_path, monkeypatch):
    path = write(tmp_path / "m", "train.csv", tiny_csv("1,2,3,4,5", "1,2,3,999,5"))
    with pytest.raises(DataError) as first:
        load_split(path.parent, "train", TINY)
    with monkeypatch.context() as m:
        _forbid_parsing(m)  # the member agent re-checks every few seconds: no re-parse
        with pytest.raises(DataError) as again:
            load_split(path.parent, "train", TINY)
    assert again.value.to_dict() == first.value.to_dict()
    assert where(again.value) == ("pixel-range", 3, "2x1", 4)
    path.write_text(tiny_csv("1,2,3,4,5", "1,2,3,99,5"))
    assert len(load_split(path.parent, "train", TINY)) == 2


def test_cache_dir_from_environment_and_unwritable_cache(tmp_path, monkeypatch):
    path = write(tmp_path / "m", "train.csv", tiny_csv("1,2,3,4,5"))
    load_split(path.parent, "train", TINY)  # cache dir from ALLIANCE_CACHE_DIR (fixture)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    cache.clear_memory_cache()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    ds = load_split(path.parent, "train", TINY, cache_dir=blocker / "cache")
    assert ds.y.tolist() == [1]


def test_corrupt_cache_file_is_ignored(tmp_path):
    cache_dir = tmp_path / "c"
    path = write(tmp_path / "m", "train.csv", tiny_csv("1,2,3,4,5"))
    load_split(path.parent, "train", TINY, cache_dir=cache_dir)
    for f in cache_dir.iterdir():
        f.write_bytes(b"not numpy")
    cache.clear_memory_cache()
    assert load_split(path.parent, "train", TINY, cache_dir=cache_dir).y.tolist() == [1]


def test_validate_data_dir_summary_and_later_load_is_free(tmp_path, monkeypatch):
    d = tmp_path / "m"
    write(d, "train.csv", tiny_csv("1,2,3,4,5", "1,0,0,0,0", "7,0,0,0,0"))
    summary = validate_data_dir(d, TINY)
    assert summary == DataSummary(
        train_rows=3,
        test_rows=0,
        label_counts={i: (2 if i == 1 else int(i == 7)) for i in range(10)},
        files={"train": str(d / "train.csv")},
    )
    with pytest.raises(DataError) as info:
        validate_data_dir(d, TINY, require_test=True)
    assert (info.value.rule, info.value.file) == ("missing-file", str(d / "test.csv"))

    write(d, "test.csv.gz", tiny_csv("0,1,2,1,1"))
    summary = validate_data_dir(d, TINY, require_test=True)
    assert summary.to_dict() == {
        "trainRows": 3,
        "testRows": 1,
        "labelCounts": {
            "0": 0,
            "1": 2,
            "2": 0,
            "3": 0,
            "4": 0,
            "5": 0,
            "6": 0,
            "7": 1,
            "8": 0,
            "9": 0,
        },
        "files": {"train": str(d / "train.csv"), "test": str(d / "test.csv.gz")},
    }
    json.dumps(summary.to_dict())
    with monkeypatch.context() as m:
        _forbid_parsing(m)
        assert len(load_split(d, "test", TINY)) == 1

    write(d, "test.csv", tiny_csv("0,1,1,1,300"))  # test.csv is preferred over test.csv.gz
    with pytest.raises(DataError) as info:
        validate_data_dir(d, TINY)
    assert (info.value.rule, info.value.file, info.value.line) == (
        "pixel-range",
        str(d / "test.csv"),
        2,
    )


# --- prediction input ----------------------------------------------------------------------


def test_read_features_csv_with_and_without_label(tmp_path):
    with_label = write(tmp_path, "a.csv", tiny_csv("-1,255,0,0,0", ",0,255,0,0"))
    x, labels = read_features_csv(with_label, TINY)  # the labels are not checked
    assert x.dtype == np.float32 and x.shape == (2, 2, 2, 1)
    assert x.reshape(2, 4).tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    assert labels.dtype == np.float64 and labels[0] == -1 and np.isnan(labels[1])

    without = write(tmp_path, "b.csv", "1x1,1x2,2x1,2x2\n0,0,0,255\n")
    x, labels = read_features_csv(without, TINY)
    assert x.reshape(1, 4).tolist() == [[0, 0, 0, 1]] and labels is None

    # gzip, CR LF, the label last, quoted or not a number: the labels by the same line reading
    odd = write(
        tmp_path,
        "f.csv.gz",
        '1x1,1x2,2x1,2x2,label\r\n0,0,0,0,"7"\r\n0,0,0,0,cat\r\n0,0,0,0, 3 \r\n',
    )
    x, labels = read_features_csv(odd, TINY)
    assert x.shape == (3, 2, 2, 1) and labels[[0, 2]].tolist() == [7, 3] and np.isnan(labels[1])

    bad = write(tmp_path, "c.csv", "1x1,1x2,2x1,2x2\n0,0,0,255\n0,0,x,0\n")
    with pytest.raises(DataError) as info:
        read_features_csv(bad, TINY)
    assert where(info.value) == ("non-numeric", 3, "2x1", 3)
    assert info.value.file == str(bad)

    extra = write(tmp_path, "e.csv", tiny_csv("x,1,2,3,4", "y,1,2,3,4", "z,1,2,3,4,5"))
    with pytest.raises(DataError) as info:
        read_features_csv(extra, TINY)
    assert where(info.value) == ("column-count", 4, None, None)

    wrong = write(tmp_path, "d.csv", "1x1,1x2,2x1\n0,0,0\n")
    with pytest.raises(DataError) as info:
        read_features_csv(wrong, TINY)
    assert where(info.value) == ("column-count", 1, None, None)
    with pytest.raises(DataError) as info:
        read_features_csv(tmp_path / "nope.csv", TINY)
    assert info.value.rule == "missing-file"


# --- schema --------------------------------------------------------------------------------


def test_schema_from_dict_to_dict_and_fingerprint():
    camel = DataSchema.from_dict(
        {
            "labelColumn": "y",
            "featureShape": [4, 4],
            "numClasses": 3,
            "minValue": -1,
            "maxValue": 1,
            "scale": 1,
            "delimiter": ";",
        }
    )
    snake = DataSchema.from_dict(
        {
            "label_column": "y",
            "feature_shape": [4, 4],
            "num_classes": 3,
            "min_value": -1.0,
            "max_value": 1.0,
            "scale": 1.0,
            "delimiter": ";",
        }
    )
    assert camel == snake and camel.feature_shape == (4, 4)
    assert camel.to_dict() == {
        "labelColumn": "y",
        "featureShape": [4, 4],
        "numClasses": 3,
        "minValue": -1.0,
        "maxValue": 1.0,
        "scale": 1.0,
        "delimiter": ";",
    }
    assert DataSchema.from_dict(camel.to_dict()) == camel
    assert DataSchema.from_dict(None) == DataSchema() == DataSchema.from_dict({})
    assert camel.fingerprint() == snake.fingerprint() != DataSchema().fingerprint()
    assert len(DataSchema().fingerprint()) == 16
    assert DataSchema().column_names()[:3] == ["label", "1x1", "1x2"]
    assert DataSchema().column_names()[-1] == "28x28" and DataSchema().feature_count == 784


@pytest.mark.parametrize(
    ("d", "field"),
    [
        ({"labelColum": "x"}, "labelColum"),
        ({"numClasses": "10"}, "numClasses"),
        ({"numClasses": True}, "numClasses"),
        ({"featureShape": [28, 0]}, "featureShape"),
        ({"featureShape": "28x28"}, "featureShape"),
        ({"maxValue": "255"}, "maxValue"),
        ({"minValue": 10, "maxValue": 1}, "minValue"),
        ({"scale": 0}, "scale"),
        ({"delimiter": ",,"}, "delimiter"),
        ({"labelColumn": ""}, "labelColumn"),
        ({"scale": None}, "scale"),
        ({"scale": 1, "scale_": 2}, "scale_"),
        ({"numClasses": 10, "num_classes": 10}, "numClasses"),
    ],
)
def test_schema_errors_name_the_field(d, field):
    with pytest.raises(DataError) as info:
        DataSchema.from_dict(d)
    assert info.value.rule == "schema"
    assert field in str(info.value)


def test_schema_load_yaml_json_and_errors(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text(
        "# comment\nlabelColumn: digit\nfeatureShape: [8, 8, 1]\nmaxValue: 16\nscale: 16\n"
    )
    assert DataSchema.load(y) == DataSchema(
        label_column="digit", feature_shape=(8, 8, 1), max_value=16, scale=16
    )
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"dataSchema": {"numClasses": 2}}))
    assert DataSchema.load(j).num_classes == 2

    bad = tmp_path / "bad.yaml"
    bad.write_text("numClasses: 10\nfeatureShape: [28, 28\n")
    with pytest.raises(DataError) as info:
        DataSchema.load(bad)
    assert (info.value.rule, info.value.file) == ("schema", str(bad))
    assert info.value.line is not None

    unknown = tmp_path / "u.yaml"
    unknown.write_text("numClases: 10\n")
    with pytest.raises(DataError, match=r"u\.yaml: schema: unknown field 'numClases'"):
        DataSchema.load(unknown)
    with pytest.raises(DataError, match="not found"):
        DataSchema.load(tmp_path / "missing.yaml")


def test_example_schema_file_is_the_default():
    assert DataSchema.load(ROOT / "examples" / "schema.yaml") == DataSchema()


def test_data_error_format_and_pickle():
    e = DataError("nan", "empty cell", file="d/train.csv", line=3, column="1x1", column_index=2)
    assert str(e) == "d/train.csv, line 3, column '1x1' (col 2): nan: empty cell"
    assert str(DataError("x", "m")) == "x: m"
    assert str(DataError("x", "m", line=4, column=7)) == "line 4, column 7: x: m"
    assert isinstance(e, ValueError)
    back = pickle.loads(pickle.dumps(e))
    assert back.to_dict() == e.to_dict() and str(back) == str(e)
    assert set(RULES) >= {
        "missing-file",
        "empty-file",
        "missing-label-column",
        "wrong-delimiter",
        "column-count",
        "non-numeric",
        "nan",
        "pixel-range",
        "label-range",
        "duplicate-column",
        "bad-gzip",
    }


# --- real MNIST ----------------------------------------------------------------------------


@pytest.mark.skipif(not (MNIST_DIR / "test.csv.gz").exists(), reason="no ../shared/data/mnist")
def test_real_mnist_test_file_round_trip(tmp_path, monkeypatch):
    d = tmp_path / "member"
    d.mkdir()
    (d / "test.csv.gz").symlink_to(MNIST_DIR / "test.csv.gz")
    ds = load_split(d, "test", cache_dir=tmp_path / "c")
    assert ds.x.shape == (10000, 28, 28, 1) and ds.x.dtype == np.float32
    assert np.bincount(ds.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.y[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first MNIST test digits
    # a 7: the centre column of the image is inked somewhere, the corners are blank
    assert ds.x[0, :, 14, 0].max() > 0.5 and ds.x[0, 0, 0, 0] == 0.0
    cache.clear_memory_cache()
    _forbid_parsing(monkeypatch)
    cached = load_split(d, "test", cache_dir=tmp_path / "c")
    assert np.array_equal(cached.x, ds.x) and np.array_equal(cached.y, ds.y)
