"""What a user gets by default: FedAvg variants simulated in one process, rounds to 0.988.

The 9a/9f setting without the platform around it: 3 members, each an IID third of the full
MNIST training rows, the seed CNN (seed 0, as ``alliance init``), each member keeping its own
compiled model and Adam state across rounds (as the agent does), the server step through the
real strategies (``alliance.strategies``), the global model evaluated on the 10,000 test rows
after every round. Each candidate runs until it reaches the target or ``--rounds``.

    .venv/bin/python -m benchmarks.tune_defaults \\
        --candidates "fedavg;fedavgm:serverLearningRate=2,serverMomentum=0" [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.common import cores, mnist_files, say

TARGET = 0.988


def parse_candidate(text: str) -> tuple[str, dict, dict]:
    """``name:param=v,...`` with the members' own settings as ``lr=`` (Adam's learning rate),
    ``epochs=`` and ``batch=``; the rest are the strategy's parameters."""
    name, _, params = text.partition(":")
    values, local = {}, {}
    for part in filter(None, params.split(",")):
        key, _, value = part.partition("=")
        key = key.strip()
        (local if key in ("lr", "epochs", "batch") else values)[key] = float(value)
    return name.strip(), values, local


def simulate(name, params, local, members, test, rounds, epochs, batch_size) -> list[dict]:
    import keras

    from alliance import strategies
    from alliance.model import build_cnn
    from alliance.strategies.base import Update

    keras.utils.set_random_seed(0)
    global_weights = build_cnn().get_weights()
    models = [build_cnn() for _ in members]
    if "lr" in local:
        for m in models:
            m.optimizer.learning_rate.assign(local["lr"])
    epochs = int(local.get("epochs", epochs))
    batch_size = int(local.get("batch", batch_size))
    strategy = strategies.create(name, params)
    state = None
    history = []
    for r in range(1, rounds + 1):
        started = time.perf_counter()
        updates = []
        for i, (model, data) in enumerate(zip(models, members, strict=True)):
            model.set_weights(global_weights)
            model.fit(data.x, data.y, epochs=epochs, batch_size=batch_size, verbose=0)
            new = model.get_weights()
            updates.append(Update(f"m{i}", len(data), lambda new=new: new))
        global_weights, state = strategy.aggregate(global_weights, updates, state)
        models[0].set_weights(global_weights)
        accuracy = float(models[0].evaluate(test.x, test.y, batch_size=256, verbose=0)[1])
        history.append({"round": r, "accuracy": accuracy, "seconds": time.perf_counter() - started})
        say(
            f"{name} {params} {local}: round {r} accuracy {accuracy:.4f}, "
            f"{history[-1]['seconds']:.0f} s"
        )
        if accuracy >= TARGET:
            break
    return history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--candidates", default="fedavg;fedavgm:serverLearningRate=2,serverMomentum=0")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--members-dir", type=Path, required=True, help="3 IID member dirs (split)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from alliance.data.datadir import load_split
    from alliance.model import configure_threads

    configure_threads(cores())
    dirs = sorted(d for d in args.members_dir.iterdir() if d.is_dir())
    members = [load_split(d, "train", cache_dir=args.cache_dir) for d in dirs]
    test = load_split(mnist_files()[1].parent, "test", cache_dir=args.cache_dir)
    results = {}
    for text in args.candidates.split(";"):
        name, params, local = parse_candidate(text)
        results[text] = simulate(
            name, params, local, members, test, args.rounds, args.epochs, args.batch_size
        )
    for text, history in results.items():
        reached = next((h["round"] for h in history if h["accuracy"] >= TARGET), None)
        curve = ", ".join(f"{h['accuracy']:.4f}" for h in history)
        say(f"{text}: {curve}; {TARGET} at round {reached}")
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
