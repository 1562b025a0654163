"""Regenerate examples/mnist-sample/ from the full MNIST CSVs (a seeded random sample).

python scripts/make_sample.py ../shared/data/mnist examples/mnist-sample
"""

import gzip
import random
import sys
from pathlib import Path

SIZES = {"train": 10_000, "test": 2_000}


def main(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in SIZES.items():
        with gzip.open(src / f"{split}.csv.gz", "rt", newline="") as f:
            header, *rows = f.read().splitlines()
        picked = sorted(random.Random(f"alliance-sample-{split}").sample(range(len(rows)), n))
        text = header + "\n" + "".join(rows[i] + "\n" for i in picked)
        # mtime=0: the same input gives the same bytes.
        with (
            open(dst / f"{split}.csv.gz", "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as out,
        ):
            out.write(text.encode())


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
