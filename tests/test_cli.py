"""The `alliance` command end to end: real S3 server, member processes, TensorFlow."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from alliance.engine import RunStatus
from alliance.s3server import S3Server
from alliance.store import Store

from .conftest import SAMPLE_DIR, write_rows

ALLIANCE = [sys.executable, "-m", "alliance"]


def run_cli(*args, timeout=300, **kw):
    return subprocess.run(
        [*ALLIANCE, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw
    )


@pytest.fixture
def small_dataset(tmp_path):
    d = tmp_path / "data"
    write_rows(d / "train.csv", 1500)
    write_rows(d / "test.csv", 300, SAMPLE_DIR / "test.csv.gz")
    return d


def start_run(data_dir, work, members):
    """`alliance run` of 3 rounds as a child whose output the test reads line by line."""
    args = ["run", "--data-dir", data_dir, "--members", members, "--rounds", 3,
            "--work-dir", work, "--run", "r"]  # fmt: skip
    return subprocess.Popen([*ALLIANCE, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def descendants_of(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_help_teaches():
    out = run_cli("--help").stdout
    for command in ("demo", "run", "member", "coordinate", "init", "check-data", "predict"):
        assert command in out
    member = run_cli("member", "--help").stdout
    assert "ALLIANCE_S3_ENDPOINT" in member and "docs/data-format.md" in member


def test_check_data_reports_the_exact_error_without_a_traceback(tmp_path):
    write_rows(tmp_path / "train.csv", 3)
    text = (tmp_path / "train.csv").read_text().replace(",", ";")
    (tmp_path / "train.csv").write_text(text)
    result = run_cli("check-data", tmp_path)
    assert result.returncode == 1
    assert "wrong-delimiter" in result.stderr and "Traceback" not in result.stderr
    write_rows(tmp_path / "train.csv", 3)
    ok = run_cli("check-data", tmp_path)
    assert ok.returncode == 0 and "train" in ok.stdout and "3 rows" in ok.stdout


def test_invalid_run_flags_are_clear_errors(tmp_path):
    result = run_cli("run", "--rounds", "0", "--work-dir", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: spec.rounds: must be at least 1, got 0"


def test_an_unknown_cpu_sharing_is_a_clear_error(tmp_path):
    result = run_cli("run", "--cpu-sharing", "fast", "--work-dir", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: CPU sharing 'fast': use auto, turns, shared or a number of members at once"
    )


def test_an_unusable_cpu_lease_directory_names_the_setting(tmp_path):
    (tmp_path / "file").write_text("")
    env = {
        **os.environ,
        "ALLIANCE_S3_ENDPOINT": "http://127.0.0.1:9",
        "ALLIANCE_S3_ACCESS_KEY": "a",
        "ALLIANCE_S3_SECRET_KEY": "b",
        "ALLIANCE_BUCKET": "alliance",
        "ALLIANCE_CPU_LEASE": str(tmp_path / "file" / "lease"),
    }
    result = run_cli("member", "--name", "m", "--data-dir", tmp_path, env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: ALLIANCE_CPU_LEASE='{tmp_path / 'file' / 'lease'}': not a usable directory "
        "(Not a directory)"
    )


@pytest.mark.slow
def test_members_taking_turns_train_one_at_a_time(tmp_path, small_dataset):
    work = tmp_path / "work"
    result = run_cli(
        "run",
        "--data-dir",
        small_dataset,
        "--members",
        2,
        "--rounds",
        1,
        "--cpu-sharing",
        "turns",
        "--work-dir",
        work,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cores = len(os.sched_getaffinity(0))
    assert f"taking turns, {cores} CPU thread(s) each" in result.stdout
    assert (work / "cpu-lease" / "cpu-lease.0").exists()
    # Each member logs its task with the seconds it waited for the lease: one trained at
    # once, the other waited for it.
    waits = sorted(
        float(re.search(r"train done .*cpuWaitSeconds ([\d.]+)", log.read_text()).group(1))
        for log in (work / "logs").glob("member-*.log")
    )
    assert len(waits) == 2 and waits[0] < 0.5 < waits[1], waits


@pytest.mark.slow
def test_run_trains_and_predict_labels_a_csv(tmp_path, small_dataset):
    work = tmp_path / "work"
    result = run_cli(
        "run",
        "--data-dir",
        small_dataset,
        "--members",
        3,
        "--rounds",
        2,
        "--work-dir",
        work,
        "--run",
        "small",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"round 1/2: 3 members done, [\d.]+ s, accuracy 0\.\d{4}", out)
    accuracy = float(re.search(r"final test accuracy: ([\d.]+)", out).group(1))
    assert accuracy > 0.75, out
    assert "final model: models/" in out
    # The report page: printed, written, and kept in the store with the run.
    page = work / "reports" / "small" / "report.html"
    assert f"report (charts per round and member): {page}" in out
    assert "<svg" in page.read_text() and (work / "s3").exists()
    pred = run_cli(
        "predict",
        "--work-dir",
        work,
        "--run",
        "small",
        "--input",
        small_dataset / "test.csv",
        "--output",
        tmp_path / "labels.csv",
    )
    assert pred.returncode == 0, pred.stderr
    lines = (tmp_path / "labels.csv").read_text().splitlines()
    assert lines[0] == "prediction,confidence" and len(lines) == 301
    predicted = float(
        re.search(r"accuracy against the file's labels: ([\d.]+)", pred.stdout).group(1)
    )
    # The members' test shards together are this file: the same accuracy, to rounding.
    assert predicted == pytest.approx(accuracy, abs=0.002)


@pytest.mark.slow
def test_ctrl_c_stops_everything_and_the_run_resumes(tmp_path, small_dataset):
    work = tmp_path / "work"
    proc = start_run(small_dataset, work, members=2)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("round 1/3"):
                break
        children = descendants_of(proc.pid)
        assert len(children) >= 3  # the S3 gateway and two members at least
        interrupted_at = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines)
    time.sleep(0.5)
    assert [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE] == []
    resumed = run_cli(
        "run",
        "--resume",
        "--members",
        "2",
        "--work-dir",
        work,
        "--rounds",
        3,
        "--data-dir",
        small_dataset,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    table = resumed.stdout.split("round  members")[1]
    rounds = [int(row.split()[0]) for row in table.strip().splitlines()[1:4]]
    assert rounds == [1, 2, 3]
    with S3Server(work / "s3") as server:
        status = RunStatus.from_dict(Store(server.config).get_run_status("r"))
    # Round 1 is the one finished before Ctrl-C, not a repeat.
    assert status.history[0].finished_at < interrupted_at < status.history[1].finished_at


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ALLIANCE_SKIP_DEMO") == "1", reason="ALLIANCE_SKIP_DEMO=1")
def test_the_readme_demo_reaches_97_percent(tmp_path):
    """The README's demo command exactly: 3 members x 3 rounds on the shipped sample."""
    started = time.monotonic()
    result = run_cli("demo", "--work-dir", tmp_path / "demo", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    accuracy = float(re.search(r"final test accuracy: ([\d.]+)", result.stdout).group(1))
    assert accuracy >= 0.97, result.stdout
    print(f"demo: accuracy {accuracy:.4f} in {time.monotonic() - started:.0f} s")


def test_flags_override_the_spec_file_and_the_rest_keeps_its_values(tmp_path):
    from alliance.cli import _run_spec, build_parser
    from alliance.engine import RunSpec

    spec_file = tmp_path / "run.yaml"
    spec_file.write_text("rounds: 10\nlocalEpochs: 3\naggregator: median\nseed: 7\n")
    args = build_parser().parse_args(["run", "--spec", str(spec_file), "--epochs", "4"])
    spec = RunSpec.from_dict(_run_spec(args))
    assert (spec.rounds, spec.local_epochs, spec.aggregator, spec.seed) == (10, 4, "median", 7)
    assert spec.min_members == 2  # a majority of the 3 members
    demo = RunSpec.from_dict(_run_spec(build_parser().parse_args(["demo"])))
    assert (demo.rounds, demo.local_epochs, demo.batch_size) == (3, 2, 32)


@pytest.mark.slow
def test_a_member_that_dies_is_started_again_and_its_round_keeps_it(tmp_path, small_dataset):
    proc = start_run(small_dataset, tmp_path / "work", members=3)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("round 1/3"):
                victim = [
                    c for c in descendants_of(proc.pid) if "member-2" in " ".join(c.cmdline())
                ]
                assert len(victim) == 1
                victim[0].kill()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert re.search(r"member-2 crashed \(exit -9\): .*; starting it again \(1 of 3\)", out), out
    table = out.split("round  members")[1].strip().splitlines()[1:4]
    # Every round aggregated all three members: nobody was dropped.
    assert [row.split()[1:3] for row in table] == [["3", "0"]] * 3, out


def test_progress_without_a_terminal_prints_a_stage_then_its_news_every_few_seconds(monkeypatch):
    import io
    from types import SimpleNamespace

    from alliance import cli

    out = io.StringIO()
    progress = cli.Progress(SimpleNamespace(rounds=3), "r", stream=out)
    clock = [100.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])

    def status(message, stage="train"):
        return SimpleNamespace(history=[], message=message, round=1, stage=stage)

    progress.update(status("round 1: 0 of 3 updates in"))
    clock[0] += 2
    progress.update(status("round 1: 1 of 3 updates in"))  # too soon: not printed
    clock[0] += 10
    progress.update(status("round 1: 2 of 3 updates in"))
    progress.update(status("round 1: validating", stage="validate"))  # a new stage: at once
    assert out.getvalue().splitlines() == [
        "  round 1: 0 of 3 updates in",
        "  round 1: 2 of 3 updates in",
        "  round 1: validating",
    ]


def test_a_member_that_cannot_start_is_named_with_its_last_error_line(tmp_path):
    """The runner's wait for its members: a member that crashes for good is reported with the
    last line of its log, at once, and no member left means the run stops with that."""
    import subprocess
    import sys

    from alliance.embedded import EmbeddedAlliance, MemberProcess

    with EmbeddedAlliance(tmp_path / "w", max_restarts=0) as alliance:
        log = tmp_path / "m.log"
        code = "import sys; print('loading'); sys.exit('OSError: cannot read /data/train.csv')"
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        alliance.members.append(MemberProcess("m", tmp_path, proc, {}, log))
        started = time.monotonic()
        with pytest.raises(ValueError) as info:
            alliance.wait_until_ready(timeout=60)
    assert time.monotonic() - started < 20
    assert str(info.value) == (
        "no member can take part: m: crashed: OSError: cannot read /data/train.csv"
    )


@pytest.mark.parametrize(
    "content,message",
    [
        (b"- 1\n", "not a mapping of alliance, member and store"),
        (b"\x8a\x00garbage", "not a YAML join bundle"),
        (
            b"alliance: a\nmember: ../b\nstore: {endpoint: http://x, bucket: b, accessKey: k, "
            b"secretKey: s}\n",
            "member name '../b'",
        ),
        (b"alliance: a\nmember: m\nstore: {endpoint: ftp://x}\n", "store.bucket: missing"),
    ],
    ids=["list", "binary", "someone-elses-path", "missing-keys"],
)
def test_a_bad_join_bundle_is_one_clear_line(tmp_path, content, message):
    bundle = tmp_path / "bundle.yaml"
    bundle.write_bytes(content)
    result = run_cli("member", "--join", bundle, "--data-dir", tmp_path, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
