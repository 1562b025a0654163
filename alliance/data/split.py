"""Splitting a dataset among members: IID or non-IID (Dirichlet), reproducibly.

Used by ``alliance split`` and by the embedded runner (``alliance run``); it imports nothing that
starts processes or servers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from alliance.data.csvfile import Layout, header_columns, read_csv_file
from alliance.data.parse import class_labels
from alliance.data.schema import DataSchema, coerce_schema


def split_labels(
    labels: np.ndarray, members: int, mode: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Row indices per member. IID: a seeded shuffle cut in equal parts. Dirichlet: for each
    class, its rows are shared out in proportions drawn from Dir(alpha) (smaller alpha, more
    skew), the usual way to simulate non-IID members."""
    rng = np.random.default_rng(seed)
    if mode == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), members)]
    if mode != "dirichlet":
        raise ValueError(f"split mode must be 'iid' or 'dirichlet', got {mode!r}")
    parts: list[list[int]] = [[] for _ in range(members)]
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        cuts = (np.cumsum(rng.dirichlet([alpha] * members)) * len(rows)).astype(int)[:-1]
        for i, chunk in enumerate(np.split(rows, cuts)):
            parts[i].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def split_dataset(
    train: Path,
    test: Path | None,
    out_dir: Path,
    members: int,
    mode: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    schema: DataSchema | Mapping | None = None,
) -> list[Path]:
    """Write ``member-<i>/train.csv`` (and ``test.csv``) under ``out_dir``; returns the dirs.

    Each file is read as the members' checks read it (plain or gzipped) and only its label
    column is checked (the schema's ``labelColumn`` and ``delimiter``; the labels must be
    integers), with the same errors; the other cells are each member's check's business. Rows
    are copied byte for byte, with "\\n" line ends.
    """
    schema = coerce_schema(schema)
    dirs = [out_dir / f"member-{i + 1}" for i in range(members)]
    for split, path in (("train", train), ("test", test)):
        if path is None:
            continue
        csv_file = read_csv_file(Path(path), str(path))
        columns = header_columns(csv_file, schema, labelled=True)
        csv_file.require_rows()
        labels = class_labels(csv_file, Layout.of(csv_file.file, schema, columns, labelled=True))
        lines = csv_file.lines
        parts = split_labels(labels, members, mode, alpha, seed if split == "train" else seed + 1)
        for d, idx in zip(dirs, parts, strict=True):
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"{split}.csv", "wb") as f:
                f.write(csv_file.header + b"\n")
                f.writelines(lines[i] + b"\n" for i in idx)
    return dirs
