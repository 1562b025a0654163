"""A custom shape end to end: examples/digits (8×8 images, pixels 0..16), from CSV to predict.

The commands are the ones examples/digits/README.md and docs/member-commands.md give, run as
subprocesses from the project root, with the work dir and outputs in a temporary directory.
Members train unseeded, so accuracies are bounded with a margin: 3 rounds × 10 epochs measured
0.97-0.99 on the 360 test rows with either model.
"""

import gzip
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow

DIGITS = PROJECT_ROOT / "examples" / "digits"
BIN = Path(sys.executable).parent
# `alliance` as installed next to this Python (.venv/bin/alliance), as the docs call it.
ALLIANCE = (
    [str(BIN / "alliance")] if (BIN / "alliance").exists() else [sys.executable, "-m", "alliance"]
)
SCHEMA = ["--schema", "examples/digits/schema.yaml"]
TRAINING = ["--members", "3", "--rounds", "3", "--epochs", "10"]
MIN_ACCURACY = 0.9


def sh(*args, timeout=300):
    """A command run from the project root, as the docs run it; (result, seconds)."""
    started = time.monotonic()
    result = subprocess.run(
        [str(a) for a in args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout
    )
    return result, time.monotonic() - started


def alliance(*args, timeout=300):
    return sh(*ALLIANCE, *args, timeout=timeout)


def shipped_test_labels():
    with gzip.open(DIGITS / "test.csv.gz", "rt") as f:
        header, *rows = f.read().splitlines()
    assert header.split(",")[:2] == ["label", "1x1"] and header.endswith(",8x8")
    return [int(row.split(",", 1)[0]) for row in rows]


def one_error_line(result) -> str:
    """The failure's stderr: exactly one line, no traceback anywhere."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("model", ["model.keras", "built-in"])
def test_digits_from_csv_to_predict(tmp_path, model):
    checked, _ = alliance("check-data", "examples/digits", *SCHEMA)
    assert checked.returncode == 0, checked.stderr
    assert "train: examples/digits/train.csv.gz: 1437 rows" in checked.stdout
    assert "test: examples/digits/test.csv.gz: 360 rows" in checked.stdout
    model_flag = []
    if model == "model.keras":
        made, _ = sh(sys.executable, "examples/digits/make_model.py", tmp_path / "model.keras")
        assert made.returncode == 0, made.stderr
        assert "input [8, 8, 1], output [10]" in made.stdout
        model_flag = ["--model", tmp_path / "model.keras"]
    work = tmp_path / "work"
    run, seconds = alliance("run", "--data-dir", "examples/digits", *SCHEMA, *model_flag,
                            *TRAINING, "--work-dir", work, "--run", "digits")  # fmt: skip
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert "run digits: Completed — completed 3 rounds" in out
    final = float(re.search(r"^final test accuracy: (0\.\d{4})$", out, re.M).group(1))
    assert final > MIN_ACCURACY, out
    rounds = re.findall(r"^round \d/3: 3 members done, ([\d.]+) s", out, re.M)
    trained = sum(map(float, rounds))
    print(f"{model}: final accuracy {final:.4f}; rounds {trained:.0f} s, run {seconds:.0f} s")

    labels = tmp_path / "labels.csv"
    pred, _ = alliance("predict", "--work-dir", work, "--run", "digits",
                       "--input", "examples/digits/test.csv.gz", "--output", labels)  # fmt: skip
    assert pred.returncode == 0, pred.stderr
    assert re.search(r"^wrote 360 predictions to .*labels\.csv \(model [0-9a-f]{12}\)$",
                     pred.stdout, re.M), pred.stdout  # fmt: skip
    header, *rows = labels.read_text().splitlines()
    assert header == "prediction,confidence" and len(rows) == 360
    predictions = [int(row.split(",")[0]) for row in rows]
    confidences = [float(row.split(",")[1]) for row in rows]
    assert set(predictions) <= set(range(10))
    assert all(0.1 <= c <= 1 for c in confidences)  # the largest of 10 probabilities
    truth = shipped_test_labels()
    accuracy = sum(p == t for p, t in zip(predictions, truth, strict=True)) / len(truth)
    assert accuracy > MIN_ACCURACY
    printed = float(re.search(r"accuracy against the file's labels: ([\d.]+)", pred.stdout)[1])
    assert printed == pytest.approx(accuracy, abs=1e-4)
    # The members' test shards together are this file: the run's accuracy, to rounding.
    assert accuracy == pytest.approx(final, abs=0.002)


MODEL_28 = """\
import sys, keras
model = keras.Sequential([keras.Input(shape=(28, 28, 1)), keras.layers.Flatten(),
                          keras.layers.Dense(10, activation="softmax")])
model.save(sys.argv[1])
"""


def test_a_model_of_another_shape_fails_in_seconds_with_one_line(tmp_path):
    made, _ = sh(sys.executable, "-c", MODEL_28, tmp_path / "mnist.keras")
    assert made.returncode == 0, made.stderr
    run, seconds = alliance("run", "--data-dir", "examples/digits", *SCHEMA,
                            "--model", tmp_path / "mnist.keras", *TRAINING,
                            "--work-dir", tmp_path / "work", "--run", "digits",
                            timeout=120)  # fmt: skip
    error = one_error_line(run)
    shapes = "the model's input shape is [28, 28, 1] but the data's featureShape is [8, 8, 1]"
    assert shapes in error
    assert seconds < 45, f"the run failed only after {seconds:.0f} s"
    print(f"28×28 model: failed in {seconds:.1f} s: {error}")


def test_without_the_schema_the_run_fails_fast_with_the_check_data_message(tmp_path):
    checked, _ = alliance("check-data", "examples/digits")
    problem = one_error_line(checked).split(" line 1: ", 1)[1]
    assert problem.startswith("column-count: the header has 65 columns; the schema expects 785")
    run, seconds = alliance("run", "--data-dir", "examples/digits", *TRAINING,
                            "--work-dir", tmp_path / "work", "--run", "digits",
                            timeout=120)  # fmt: skip
    error = one_error_line(run)
    assert error.startswith("error: no member can take part: member-1: invalid: ")
    for member in ("member-1", "member-2", "member-3"):
        assert f"{member}/train.csv, line 1: {problem}" in error
    assert seconds < 45, f"the run failed only after {seconds:.0f} s"
    print(f"no schema: failed in {seconds:.1f} s")
