"""The centralized baseline of 9a, run in its own process: ``python -m benchmarks.centralized``.

The same model (``alliance.model.build_cnn()``, seeded like ``alliance init``) trained on
every training row, evaluated on every test row after each epoch, with TensorFlow's default
threading (all cores), for ``--epochs`` or until ``--until`` accuracy. Parsing (through the
same parse cache as the members) is not timed.
Progress goes to stdout as ``progress: ...`` lines; the last line is the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--until", type=float, default=None, help="stop at this test accuracy")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from alliance.data.datadir import load_split

    started = time.perf_counter()
    train = load_split(args.data_dir, "train", cache_dir=args.cache_dir)
    test = load_split(args.data_dir, "test", cache_dir=args.cache_dir)
    parse_seconds = time.perf_counter() - started
    print(
        f"progress: data ready ({len(train)} train, {len(test)} test rows, "
        f"{parse_seconds:.1f} s); importing TensorFlow",
        flush=True,
    )

    import keras
    import tensorflow as tf

    from alliance.model import build_cnn

    keras.utils.set_random_seed(args.seed)  # as `alliance init`: the federation's seed model
    model = build_cnn()
    print(f"progress: training up to {args.epochs} epoch(s) on {len(train)} rows", flush=True)
    epochs = []
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        history = model.fit(
            train.x, train.y, epochs=1, batch_size=args.batch_size, shuffle=True, verbose=0
        )
        fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        loss, accuracy = model.evaluate(test.x, test.y, batch_size=256, verbose=0)[:2]
        eval_seconds = time.perf_counter() - started
        epochs.append(
            {
                "epoch": epoch,
                "fitSeconds": fit_seconds,
                "evalSeconds": eval_seconds,
                "seconds": fit_seconds + eval_seconds,
                "trainLoss": float(history.history["loss"][-1]),
                "accuracy": float(accuracy),
                "loss": float(loss),
            }
        )
        print(
            f"progress: epoch {epoch}: fit {fit_seconds:.1f} s + evaluate {eval_seconds:.1f} s, "
            f"accuracy {accuracy:.4f}",
            flush=True,
        )
        if args.until is not None and accuracy >= args.until:
            break
    first = epochs[0]
    print(
        json.dumps(
            {
                "trainRows": len(train),
                "testRows": len(test),
                # The first epoch, for 9a; every epoch, for 9f.
                **{k: first[k] for k in ("fitSeconds", "evalSeconds", "seconds", "accuracy")},
                "samplesPerSecond": len(train) / first["fitSeconds"],
                "epochs": epochs,
                "parseSeconds": parse_seconds,
                "intraOpThreads": tf.config.threading.get_intra_op_parallelism_threads(),
                "interOpThreads": tf.config.threading.get_inter_op_parallelism_threads(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
