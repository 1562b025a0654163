"""Make examples/digits/ (train.csv.gz, test.csv.gz) from the UCI optical digits data.

The source is the test part (1,797 rows) of the UCI "Optical Recognition of Handwritten
Digits" data set (E. Alpaydin and C. Kaynak, 1998; https://doi.org/10.24432/C50P49; licence
CC BY 4.0): 8x8 images of handwritten digits, each pixel a count 0..16, and the digit 0..9.
scikit-learn ships it as sklearn/datasets/data/digits.csv.gz (no header; 64 pixel columns,
row-major, then the label). This is how it was fetched and converted (scikit-learn 1.9.1; the
file's sha256 is SOURCE_SHA256 below):

    cd /tmp && pip download --no-deps --only-binary=:all: scikit-learn==1.9.1 -d skl \\
        && unzip -o skl/*.whl 'sklearn/datasets/data/digits.csv.gz'
    python scripts/make_digits_sample.py /tmp/sklearn/datasets/data/digits.csv.gz examples/digits

It writes, in the layout the platform reads (docs/data-format.md), a header
``label,1x1,1x2,...,8x8`` (the label first, then the pixels row by row) and the rows of a
fixed stratified split: 360 test rows (each class in proportion, largest remainders) and the
other 1,437 for training, each file in the source's row order, gzipped byte-reproducibly
(mtime 0). The same source always gives the same bytes. Standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import random
from collections import defaultdict
from pathlib import Path

SOURCE_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
SEED = "alliance-digits-split"
TEST_ROWS = 360
SIDE = 8  # 8x8 images
MAX_PIXEL = 16


def read_source(path: Path) -> list[list[int]]:
    """The source rows as integers, checked: 64 pixels in 0..16 and a label 0..9."""
    with gzip.open(path, "rt", newline="") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        cells = [int(float(c)) for c in line.split(",")]
        if len(cells) != SIDE * SIDE + 1:
            raise SystemExit(f"{path}, line {n}: {len(cells)} columns, expected {SIDE**2 + 1}")
        if not all(0 <= v <= MAX_PIXEL for v in cells[:-1]) or not 0 <= cells[-1] <= 9:
            raise SystemExit(f"{path}, line {n}: a pixel outside 0..16 or a label outside 0..9")
        rows.append(cells)
    return rows


def stratified_test_rows(labels: list[int], test_rows: int, seed: str) -> set[int]:
    """Indices of ``test_rows`` rows, each class in proportion to its size (largest
    remainders), drawn with a seeded shuffle per class."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    quotas = {c: len(idx) * test_rows / len(labels) for c, idx in by_class.items()}
    counts = {c: int(q) for c, q in quotas.items()}
    short = test_rows - sum(counts.values())
    for c in sorted(quotas, key=lambda c: (-(quotas[c] - counts[c]), c))[:short]:
        counts[c] += 1
    picked: set[int] = set()
    for c in sorted(by_class):
        idx = list(by_class[c])
        random.Random(f"{seed}-{c}").shuffle(idx)
        picked.update(idx[: counts[c]])
    return picked


def write_csv_gz(path: Path, rows: list[list[int]]) -> None:
    header = ["label"] + [f"{r}x{c}" for r in range(1, SIDE + 1) for c in range(1, SIDE + 1)]
    lines = [",".join(header)] + [",".join(map(str, [row[-1], *row[:-1]])) for row in rows]
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as out,
    ):
        out.write(("\n".join(lines) + "\n").encode())


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Write OUT/train.csv.gz and OUT/test.csv.gz (a fixed stratified split, "
        f"{TEST_ROWS} test rows) from scikit-learn's digits.csv.gz.",
        epilog="See this file's docstring for where the source comes from.",
    )
    parser.add_argument("source", type=Path, help="sklearn/datasets/data/digits.csv.gz")
    parser.add_argument("out", type=Path, help="output directory, e.g. examples/digits")
    args = parser.parse_args()
    sha = hashlib.sha256(args.source.read_bytes()).hexdigest()
    if sha != SOURCE_SHA256:
        print(f"note: {args.source} has sha256 {sha}, not the {SOURCE_SHA256} used before")
    rows = read_source(args.source)
    test = stratified_test_rows([row[-1] for row in rows], TEST_ROWS, SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    train_rows = [row for i, row in enumerate(rows) if i not in test]
    test_rows = [row for i, row in enumerate(rows) if i in test]
    write_csv_gz(args.out / "train.csv.gz", train_rows)
    write_csv_gz(args.out / "test.csv.gz", test_rows)
    for name, part in (("train", train_rows), ("test", test_rows)):
        counts = [sum(1 for row in part if row[-1] == c) for c in range(10)]
        print(f"{args.out / (name + '.csv.gz')}: {len(part)} rows, per class {counts}")


if __name__ == "__main__":
    main()
