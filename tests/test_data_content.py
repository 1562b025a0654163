"""Data that parses but is garbage: pixel columns in another order, values scaled twice, all
zeros, one row repeated (errors), one label only (a warning); through ``validate_data_dir``,
``alliance check-data`` and the member agent's ready heartbeat."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alliance import cli
from alliance.data import cache
from alliance.data.datadir import validate_data_dir
from alliance.data.errors import RULES, DataError
from alliance.data.schema import DataSchema
from alliance.member import Agent, AgentConfig

from .conftest import SAMPLE_DIR, write_rows

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = DataSchema().column_names()  # label, 1x1, ..., 28x28
PIXELS = COLUMNS[1:]
ORDER = (
    "pixel columns must be in row-major order (row by row, RxC = row R, column C): "
    "expected '{want}' here, found '{found}'"
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALLIANCE_CACHE_DIR", str(tmp_path / "cache"))
    cache.clear_memory_cache()
    yield
    cache.clear_memory_cache()


def mnist(rows: int = 600, source: Path = SAMPLE_DIR / "train.csv.gz") -> pd.DataFrame:
    """Real MNIST rows from the shipped sample."""
    return pd.read_csv(source, nrows=rows)


def write_df(d: Path, df: pd.DataFrame, name: str = "train.csv") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    df.to_csv(d / name, index=False)
    return d


def error_of(d: Path, schema: DataSchema | None = None) -> DataError:
    with pytest.raises(DataError) as info:
        validate_data_dir(d, schema)
    return info.value


# --- column order ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "column", "index", "message"),
    [
        # every pixel column, in reverse: the first one found is '28x28' (not "expected '28x29'")
        (
            PIXELS[::-1],
            "28x28",
            2,
            ORDER.format(want="1x1", found="28x28") + "; all 784 pixel columns are present, in "
            "another order: write them row by row: 1x1, 1x2, …, 28x28",
        ),
        # a transposed export: column by column
        (
            [f"{c}x{r}" for r in range(1, 29) for c in range(1, 29)],
            "2x1",
            3,
            ORDER.format(want="1x2", found="2x1") + "; all 784 pixel columns are present, column "
            "by column (1x1, 2x1, …): the images would come out transposed; write them row by "
            "row: 1x1, 1x2, …, 28x28",
        ),
        # 0-based names, shuffled: the origin comes from all the names, not the first one
        (
            [f"{r}x{c}" for r in range(28) for c in range(28)][::-1],
            "27x27",
            2,
            ORDER.format(want="0x0", found="27x27") + "; all 784 pixel columns are present, in "
            "another order: write them row by row: 0x0, 0x1, …, 27x27",
        ),
        # a name that does not belong: no claim that all the columns are there
        (
            [*PIXELS[:28], "1x29", *PIXELS[29:]],
            "1x29",
            30,
            ORDER.format(want="2x1", found="1x29"),
        ),
    ],
)
def test_column_order_names_the_column_expected_there(tmp_path, names, column, index, message):
    df = mnist(20)
    df.columns = ["label", *names]
    err = error_of(write_df(tmp_path / "m", df))
    assert (err.rule, err.line, err.column, err.column_index) == (
        "column-order",
        1,
        column,
        index,
    )
    assert err.message == message


def test_column_order_shuffled_at_random(tmp_path):
    df = mnist(20)
    shuffled = list(np.random.default_rng(0).permutation(PIXELS))
    df.columns = ["label", *shuffled]
    err = error_of(write_df(tmp_path / "m", df))
    assert err.column == shuffled[0] and err.column_index == 2
    assert err.message == ORDER.format(want="1x1", found=shuffled[0]) + (
        "; all 784 pixel columns are present, in another order: write them row by row: "
        "1x1, 1x2, …, 28x28"
    )


# --- the file as a whole --------------------------------------------------------------------


def test_prescaled(tmp_path):
    df = mnist()
    df[PIXELS] = df[PIXELS] / 255
    d = write_df(tmp_path / "m", df)
    err = error_of(d)
    assert (err.rule, err.file, err.line, err.column) == (
        "prescaled",
        str(d / "train.csv"),
        None,
        None,
    )
    assert err.message == (
        "every feature value is within 0–1 (the largest is 1): the values look scaled already, "
        "but the schema expects 0–255 and divides them by 255; write the raw values (0–255), or "
        "set maxValue: 1 and scale: 1 in the schema"
    )
    # the fix the message gives
    fixed = validate_data_dir(d, DataSchema(max_value=1, scale=1))
    assert fixed.train_rows == 600 and fixed.warnings == []

    cache.clear_memory_cache()
    df[PIXELS] = (df[PIXELS] * 0.8).round(3)  # the largest value is not 1
    err = error_of(write_df(tmp_path / "n", df))
    assert err.rule == "prescaled" and "(the largest is 0.8)" in err.message
    # scale 1: the values are not divided, so they reach the model as they are
    assert validate_data_dir(tmp_path / "n", DataSchema(scale=1)).warnings == []


def test_prescaled_in_the_test_file_and_a_custom_range(tmp_path):
    d = tmp_path / "m"
    write_rows(d / "train.csv", 50)
    test = mnist(30, SAMPLE_DIR / "test.csv.gz")
    test[PIXELS] = test[PIXELS] / 255
    write_df(d, test, "test.csv")
    err = error_of(d)
    assert (err.rule, err.file) == ("prescaled", str(d / "test.csv"))

    schema = DataSchema(feature_shape=(2, 2, 1), max_value=16, scale=16)
    rows = [[1, 0, 0.5, 1, 0], [2, 0, 0, 0.25, 0]]
    write_df(tmp_path / "c", pd.DataFrame(rows, columns=schema.column_names()))
    err = error_of(tmp_path / "c", schema)
    assert err.message == (
        "every feature value is within 0–1 (the largest is 1): the values look scaled already, "
        "but the schema expects 0–16 and divides them by 16; write the raw values (0–16), or "
        "set maxValue: 1 and scale: 1 in the schema"
    )


def test_all_zero(tmp_path):
    df = mnist()
    df[PIXELS] = 0
    d = write_df(tmp_path / "m", df)
    err = error_of(d)
    assert (err.rule, err.file, err.line) == ("all-zero", str(d / "train.csv"), None)
    assert err.message == (
        "every feature value is 0 (600 rows × 784 columns): there is nothing to learn from; "
        "check how the file was exported"
    )
    single = write_df(tmp_path / "one", df[:1])
    assert error_of(single).message.startswith("every feature value is 0 (1 row × 784 columns)")


def test_constant_features(tmp_path):
    df = mnist()
    df[PIXELS] = df[PIXELS].iloc[0].to_numpy()  # every row the first image (labels vary)
    d = write_df(tmp_path / "m", df)
    err = error_of(d)
    assert (err.rule, err.file, err.line) == ("constant-features", str(d / "train.csv"), None)
    assert err.message == (
        "all 600 rows have the same 784 feature values: the features cannot tell the classes "
        "apart; check how the file was exported (one row repeated?)"
    )
    # one row is not "every row the same"; constant columns alone are normal (MNIST borders)
    assert validate_data_dir(write_df(tmp_path / "one", df[:1])).train_rows == 1
    df = mnist()
    assert (df[PIXELS].nunique() == 1).sum() > 0
    assert validate_data_dir(write_df(tmp_path / "borders", df)).warnings == []


# --- warnings -------------------------------------------------------------------------------


def test_one_label_only_is_a_warning(tmp_path, caplog):
    df = mnist()
    df["label"] = 3
    d = write_df(tmp_path / "m", df)
    test = mnist(200, SAMPLE_DIR / "test.csv.gz")
    test["label"] = 7
    write_df(d, test, "test.csv")
    with caplog.at_level("WARNING", logger="alliance.data.datadir"):
        summary = validate_data_dir(d)
    expected = [
        f"{d}/train.csv has one label only (all 600 rows are one class): this member's updates "
        "pull the model toward one class",
        f"{d}/test.csv has one label only (all 200 rows are one class): the accuracy it reports "
        "measures that one class only",
    ]
    assert summary.warnings == expected
    assert summary.to_dict()["warnings"] == expected
    assert caplog.records == []  # said once, by the caller (check-data, the agent's log)
    assert (summary.train_rows, summary.test_rows) == (600, 200)

    # a validator (only a test file) gets the test file's warning
    (d / "train.csv").unlink()
    cache.clear_memory_cache()
    assert validate_data_dir(d, require_train=False, require_test=True).warnings == expected[1:]

    # a single row has a single label: no warning
    write_df(tmp_path / "one", df[:1])
    assert validate_data_dir(tmp_path / "one").warnings == []


def test_check_data_prints_warnings_and_exits_0(tmp_path, capsys):
    df = mnist(50)
    df["label"] = 3
    d = write_df(tmp_path / "m", df)
    assert cli.main(["check-data", str(d)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"{d}: OK",
        f"  train: {d}/train.csv: 50 rows",
        "  test: none (this member will not validate models)",
        "  train labels: 0: 0, 1: 0, 2: 0, 3: 50, 4: 0, 5: 0, 6: 0, 7: 0, 8: 0, 9: 0",
        f"  warning: {d}/train.csv has one label only (all 50 rows are one class): this member's "
        "updates pull the model toward one class",
    ]


def test_the_agent_reports_warnings_in_its_ready_heartbeat(tmp_path, store):
    d = tmp_path / "m"
    df = mnist(50)
    df["label"] = 3
    write_df(d, df)
    config = AgentConfig(name="m", data_dir=d, cache_dir=tmp_path / "c", schema=DataSchema())
    ready = Agent(store, config)._check_data()
    assert ready["state"] == "ready" and ready["trainRows"] == 50
    assert ready["warnings"] == [
        f"{d}/train.csv has one label only (all 50 rows are one class): this member's updates "
        "pull the model toward one class"
    ]
    write_rows(d / "train.csv", 50)
    assert "warnings" not in Agent(store, config)._check_data()


# --- normal data: nothing to say ------------------------------------------------------------


def test_the_shipped_sample_and_real_shards_raise_nothing_and_warn_nothing(
    tmp_path, member_dirs, capsys
):
    summary = validate_data_dir(SAMPLE_DIR, require_test=True)
    assert (summary.train_rows, summary.test_rows, summary.warnings) == (10000, 2000, [])
    assert "warnings" not in summary.to_dict()
    for d in member_dirs:
        assert validate_data_dir(d, require_test=True).warnings == []
    assert cli.main(["check-data", str(member_dirs[0])]) == 0
    assert "warning" not in capsys.readouterr().out


# --- the rules and their documentation ------------------------------------------------------


def test_every_rule_is_documented_in_check_order():
    doc = (ROOT / "docs" / "data-format.md").read_text()
    doc = doc[doc.index("## 4. Validation rules") : doc.index("## 5. Custom schemas")]
    table = re.findall(r"^\| `([a-z-]+)` \|", doc, flags=re.MULTILINE)
    assert set(table) == set(RULES)
    assert RULES[-3:] == ("all-zero", "constant-features", "prescaled")
    assert RULES.index("pixel-range") < RULES.index("all-zero")
