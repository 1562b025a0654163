"""Splitting a dataset among members: IID and Dirichlet non-IID, reproducible."""

import numpy as np
import pytest

from alliance.local import split_dataset, split_labels

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
