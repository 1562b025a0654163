"""How a member trains, validates and predicts: built-in Keras code, or the member's own commands.

Both trainers take and return weights as lists of arrays and metrics as dicts, so the agent
(``alliance.member``) does not care which one runs.

The command contract (``docs/member-commands.md``): each command is a template whose
placeholders are filled with paths and numbers, and which also receives them as environment
variables (``ALLIANCE_MODEL_IN`` ...). Weights are exchanged as ``.npz`` files of arrays
``arr_0, arr_1, ...`` in the model's layer order.

    train     {model_in} {data_dir} {model_out} {metrics_out} {epochs} {batch_size}
              writes model_out (.npz) and metrics_out (JSON with "numExamples", optional "loss",
              "accuracy")
    validate  {model_in} {data_dir} {metrics_out}
              writes metrics_out (JSON with "numExamples", "accuracy", optional "loss")
    predict   {model_in} {input} {output}
              writes output (CSV, one row per input row, a "prediction" column)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from alliance import weights
from alliance.data.datadir import load_split
from alliance.data.schema import DataSchema


class TaskError(RuntimeError):
    """A task could not be done; the message is reported to the coordinator."""


class Trainer(Protocol):
    def train(
        self, arrays: list[np.ndarray], epochs: int, batch_size: int
    ) -> tuple[list[np.ndarray], dict]: ...

    def validate(self, arrays: list[np.ndarray]) -> dict: ...


class KerasTrainer:
    """Keeps one compiled model and the member's parsed data in memory between rounds.

    The local optimizer (Adam) keeps its state across rounds instead of being rebuilt: that
    saves a recompilation per round, and it trains as well (on the 3 × 20,000-row MNIST
    benchmark, 3 rounds: 0.9882 kept vs 0.9880 reset). The state never leaves the member.
    """

    def __init__(self, model: Any, data_dir: Path, schema: DataSchema, cache_dir=None):
        self.model = model
        self.data_dir = Path(data_dir)
        self.schema = schema
        self.cache_dir = cache_dir
        self._loaded: list | None = None  # the arrays the model holds now

    def _data(self, split: str):
        return load_split(self.data_dir, split, self.schema, cache_dir=self.cache_dir)

    def _set(self, arrays: list[np.ndarray]) -> None:
        # Skip the copy into the model when it already holds exactly these arrays.
        if self._loaded is not arrays:
            self.model.set_weights(arrays)
            self._loaded = arrays

    def train(self, arrays, epochs, batch_size):
        train = self._data("train")
        self._set(arrays)
        started = time.perf_counter()
        history = self.model.fit(
            train.x, train.y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0
        )
        seconds = time.perf_counter() - started
        self._loaded = None
        hist = history.history
        return self.model.get_weights(), {
            "numExamples": len(train),
            "loss": float(hist["loss"][-1]),
            "accuracy": float(hist.get("accuracy", [float("nan")])[-1]),
            "seconds": seconds,
            "samplesPerSecond": len(train) * epochs / seconds if seconds else 0.0,
        }

    def validate(self, arrays):
        test = self._data("test")
        self._set(arrays)
        started = time.perf_counter()
        loss, accuracy = self.model.evaluate(test.x, test.y, batch_size=256, verbose=0)[:2]
        return {
            "numExamples": len(test),
            "loss": float(loss),
            "accuracy": float(accuracy),
            "seconds": time.perf_counter() - started,
        }

    def predict(self, arrays, x: np.ndarray) -> np.ndarray:
        self._set(arrays)
        return self.model.predict(x, batch_size=256, verbose=0)


@dataclass
class CommandTrainer:
    """Runs the member's own entry points under the documented contract."""

    data_dir: Path
    train_command: str | None = None
    validate_command: str | None = None
    predict_command: str | None = None
    timeout: float = 24 * 3600

    def train(self, arrays, epochs, batch_size):
        if not self.train_command:
            raise TaskError("no train command configured")
        with tempfile.TemporaryDirectory(prefix="alliance-task-") as tmp:
            paths = self._paths(tmp, arrays)
            started = time.perf_counter()
            self._run(
                self.train_command, {**paths, "epochs": str(epochs), "batch_size": str(batch_size)}
            )
            seconds = time.perf_counter() - started
            out = Path(paths["model_out"])
            if not out.exists():
                raise TaskError(f"the train command wrote no model to {{model_out}} ({out})")
            try:
                new = weights.loads(out.read_bytes())
            except weights.WeightsError as exc:
                raise TaskError(f"the train command's {{model_out}}: {exc}") from exc
            metrics = self._metrics(paths["metrics_out"], required=("numExamples",))
        metrics.setdefault("seconds", seconds)
        return new, metrics

    def validate(self, arrays):
        if not self.validate_command:
            raise TaskError("no validate command configured")
        with tempfile.TemporaryDirectory(prefix="alliance-task-") as tmp:
            paths = self._paths(tmp, arrays)
            started = time.perf_counter()
            self._run(self.validate_command, paths)
            metrics = self._metrics(paths["metrics_out"], required=("numExamples", "accuracy"))
        metrics.setdefault("seconds", time.perf_counter() - started)
        return metrics

    def predict_file(self, arrays, input_csv: Path, output_csv: Path) -> None:
        if not self.predict_command:
            raise TaskError("no predict command configured")
        with tempfile.TemporaryDirectory(prefix="alliance-task-") as tmp:
            paths = self._paths(tmp, arrays)
            self._run(
                self.predict_command, {**paths, "input": str(input_csv), "output": str(output_csv)}
            )
        if not Path(output_csv).exists():
            raise TaskError(f"the predict command wrote nothing to {{output}} ({output_csv})")

    def _paths(self, tmp: str, arrays) -> dict[str, str]:
        model_in = Path(tmp) / "model-in.npz"
        model_in.write_bytes(weights.dumps(arrays))
        return {
            "model_in": str(model_in),
            "model_out": str(Path(tmp) / "model-out.npz"),
            "metrics_out": str(Path(tmp) / "metrics.json"),
            "data_dir": str(self.data_dir),
        }

    def _run(self, template: str, values: dict[str, str]) -> None:
        try:
            argv = [part.format(**values) for part in shlex.split(template)]
        except (KeyError, ValueError) as exc:
            raise TaskError(f"command template {template!r}: unknown placeholder {exc}") from exc
        env = {**os.environ, **{f"ALLIANCE_{k.upper()}": v for k, v in values.items()}}
        try:
            proc = subprocess.run(
                argv,
                env=env,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TaskError(f"{argv[0]}: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise TaskError(f"{argv[0]} exited with {proc.returncode}: " + " | ".join(tail))

    @staticmethod
    def _metrics(path: str, required: tuple[str, ...]) -> dict:
        try:
            metrics = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise TaskError("the command wrote no metrics JSON to {metrics_out}") from exc
        except json.JSONDecodeError as exc:
            raise TaskError(f"the command's metrics JSON is invalid: {exc}") from exc
        if not isinstance(metrics, dict):
            raise TaskError("the command's metrics JSON must be an object")
        for key in required:
            if key not in metrics:
                raise TaskError(f"the command's metrics JSON lacks {key!r}")
        return metrics
