"""Splitting a dataset among members: IID and Dirichlet non-IID, reproducible; the files read as
the members' checks read them, with the same errors."""

import gzip

import numpy as np
import pytest

from alliance.data.csvfile import Layout, header_columns, read_csv_file
from alliance.data.errors import DataError
from alliance.data.parse import class_labels
from alliance.data.schema import DataSchema
from alliance.data.split import split_dataset, split_labels

from .conftest import SAMPLE_DIR, write_rows

LABELS = np.repeat(np.arange(10), 100)  # 1,000 rows, 100 per class


def test_iid_split_partitions_every_row_once_in_equal_parts():
    parts = split_labels(LABELS, 3, "iid", seed=1)
    assert [len(p) for p in parts] == [334, 333, 333]
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    # IID: every member sees every class in roughly its share.
    for p in parts:
        assert np.bincount(LABELS[p], minlength=10).min() > 15


def test_dirichlet_split_is_skewed_complete_and_seeded():
    parts = split_labels(LABELS, 4, "dirichlet", alpha=0.1, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    shares = np.array([np.bincount(LABELS[p], minlength=10) for p in parts]) / 100
    # With alpha 0.1 most classes sit mostly with one member.
    assert (shares.max(axis=0) > 0.6).sum() >= 6
    again = split_labels(LABELS, 4, "dirichlet", alpha=0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = split_labels(LABELS, 4, "dirichlet", alpha=0.1, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="'iid' or 'dirichlet'"):
        split_labels(LABELS, 2, "random")


def test_split_dataset_copies_rows_verbatim(tmp_path):
    train = write_rows(tmp_path / "train.csv", 90)
    test = write_rows(tmp_path / "test.csv", 30, SAMPLE_DIR / "test.csv.gz")
    dirs = split_dataset(train, test, tmp_path / "m", 3, seed=5)
    assert [d.name for d in dirs] == ["member-1", "member-2", "member-3"]
    header, *rows = train.read_text().splitlines()
    got = []
    for d in dirs:
        lines = (d / "train.csv").read_text().splitlines()
        assert lines[0] == header and len(lines) == 31
        got += lines[1:]
        assert len((d / "test.csv").read_text().splitlines()) == 11
    assert sorted(got) == sorted(rows)


def test_split_dataset_reads_gzip_crlf_quotes_and_any_label_column(tmp_path):
    """Any CSV with integer labels splits, whatever its other columns: gzipped, CR LF line ends,
    a BOM, the label last and quoted, trailing blank lines; lines are copied with "\n" ends."""
    rows = [f'{i},{i * 2},"{i % 3}"' for i in range(30)]
    text = "\ufeffa,b,label\r\n" + "\r\n".join(rows) + "\r\n\r\n"
    source = tmp_path / "all.csv.gz"
    source.write_bytes(gzip.compress(text.encode()))
    dirs = split_dataset(source, None, tmp_path / "m", 3, "dirichlet", alpha=0.2, seed=1)
    got = []
    for d in dirs:
        raw = (d / "train.csv").read_bytes()
        assert raw.startswith("\ufeffa,b,label\n".encode()) and b"\r" not in raw
        got += raw.decode().splitlines()[1:]
        assert not (d / "test.csv").exists()
    assert sorted(got) == sorted(rows)
    # the same rows per member as split_labels gives for these labels
    labels = np.array([i % 3 for i in range(30)])
    parts = split_labels(labels, 3, "dirichlet", alpha=0.2, seed=1)
    for d, idx in zip(dirs, parts, strict=True):
        assert (d / "train.csv").read_text().splitlines()[1:] == [rows[i] for i in idx]


def test_split_dataset_takes_the_schema_label_column_and_delimiter(tmp_path):
    source = tmp_path / "train.csv"
    source.write_text("x;digit\n" + "".join(f"{i};{i % 2}\n" for i in range(10)))
    schema = DataSchema(label_column="digit", delimiter=";")
    dirs = split_dataset(source, None, tmp_path / "m", 2, seed=3, schema=schema)
    assert sum(len((d / "train.csv").read_text().splitlines()) - 1 for d in dirs) == 10


def test_labels_for_splitting_are_integers_by_the_number_rules(tmp_path):
    schema = DataSchema()
    path = tmp_path / "t.csv"
    for text, labels in [
        ("a,label\n0,7\n1,12\n2,0\n", [7, 12, 0]),  # plain: read in bulk
        ('a,label\n0,+1\n0,2.0\n0, 3 \n0,1e1\n0,"4"\n0,-2\n', [1, 2, 3, 10, 4, -2]),
        ('a,label\n"x,7,",8\n', [8]),  # split at every comma, the second cell would be 7
    ]:
        path.write_text(text)
        csv_file = read_csv_file(path, str(path))
        layout = Layout.of(str(path), schema, header_columns(csv_file, schema, True), True)
        assert class_labels(csv_file, layout).tolist() == labels


@pytest.mark.parametrize(
    ("text", "expected", "fragment"),
    [
        ("a,b\n1,2\n", ("missing-label-column", 1, None, None), "no column 'label'"),
        ("a;label\n1;2\n", ("wrong-delimiter", 1, None, None), "';'"),
        ("label,a\n1,2\n3.5,4\n", ("label-range", 3, "label", 1), "label 3.5 is not an integer"),
        ("a,label\n1,2\n3,x\n", ("label-range", 3, "label", 2), "label 'x' is not a class number"),
        ("label,a\n1,2\n,4\n", ("nan", 3, "label", 1), "empty cell"),
        ("a,label\n1,2\n3\n", ("column-count", 3, None, None), "found 1"),
        # a quoted cell may hold the delimiter: one cell, as the checks read it
        ('label,a\n1,2\n"3,4",5\n', ("label-range", 3, "label", 1), "'3,4' is not a class number"),
        ("label,a\n1,2\n\n3,4\n", ("column-count", 3, None, None), "the line is blank"),
        ("label,a\n\n", ("empty-file", None, None, None), "no data rows"),
    ],
)
def test_split_dataset_errors_are_the_checks_errors(tmp_path, text, expected, fragment):
    source = tmp_path / "train.csv"
    source.write_text(text)
    with pytest.raises(DataError) as info:
        split_dataset(source, None, tmp_path / "m", 2)
    err = info.value
    assert (err.rule, err.line, err.column, err.column_index) == expected
    assert err.file == str(source) and fragment in err.message
    assert not (tmp_path / "m").exists()


def test_split_dataset_of_a_missing_or_bad_gzip_file(tmp_path):
    with pytest.raises(DataError) as info:
        split_dataset(tmp_path / "nope.csv", None, tmp_path / "m", 2)
    assert info.value.rule == "missing-file"
    (tmp_path / "train.csv.gz").write_text("label\n1\n")
    with pytest.raises(DataError) as info:
        split_dataset(tmp_path / "train.csv.gz", None, tmp_path / "m", 2)
    assert info.value.rule == "bad-gzip"
