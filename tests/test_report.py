"""`alliance report`: the run's page from the store alone, on a real run and on hostile records.

A real short run (`alliance run`: 2 members, 2 rounds, 600 training rows each) is made once for
the module; the page is then loaded in headless Chromium (skipped only when Chromium is not
installed), and hand-made records with hostile strings must come out escaped.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from alliance import report
from alliance.s3server import S3Server
from alliance.store import Store

from .conftest import SAMPLE_DIR, write_rows

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install -y chromium); "
    "the report page is not loaded in a browser",
)
RUN = "short"
HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_REASON = '<script>alert("pwned")</script> & more'


# --- a real run --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    """`alliance run` of 2 members x 2 rounds on 1,200 real MNIST rows, in its work dir."""
    tmp = tmp_path_factory.mktemp("report-run")
    data = tmp / "data"
    write_rows(data / "train.csv", 1200)
    write_rows(data / "test.csv", 400, SAMPLE_DIR / "test.csv.gz")
    work = tmp / "work"
    args = ["run", "--data-dir", data, "--members", 2, "--rounds", 2, "--epochs", 1,
            "--work-dir", work, "--run", RUN]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "alliance", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return work


@pytest.fixture(scope="module")
def run_store(work_dir) -> Store:
    with S3Server(work_dir / "s3") as server:
        yield Store(server.config, retry_seconds=10)


@pytest.fixture(scope="module")
def real_report(run_store) -> report.Report:
    return report.load(run_store, RUN)


def parser_args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="alliance report")
    report.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


@pytest.mark.slow
def test_load_gathers_every_round_and_member_from_the_store(run_store, real_report, monkeypatch):
    r = real_report
    assert (r.run, r.phase, r.rounds_planned, r.aggregator) == (RUN, "Completed", 2, "fedavg")
    assert [x.number for x in r.rounds] == [1, 2]
    assert r.members == ["member-1", "member-2"]
    assert r.final_accuracy == r.rounds[-1].accuracy and 0.5 < r.final_accuracy <= 1
    assert 0 < r.total_seconds < 300 and r.model_id == r.rounds[-1].model_id
    status = run_store.get_run_status(RUN)
    for rnd, rec in zip(r.rounds, status["history"], strict=True):
        assert rnd.members == rec["members"] and rnd.accuracy == rec["accuracy"]
        assert rnd.seconds == pytest.approx(rec["finishedAt"] - rec["startedAt"])
        # Each member's own metrics, from its update's metadata and its validation score:
        # they make up the round's aggregates.
        assert set(rnd.training) == set(rnd.validations) == {"member-1", "member-2"}
        t = rnd.training.values()
        assert sum(m.num_examples for m in t) == rnd.num_examples == 1200
        assert all(0 <= m.accuracy <= 1 and m.seconds > 0 for m in t)
        weighted = sum(m.loss * m.num_examples for m in t) / rnd.num_examples
        assert weighted == pytest.approx(rnd.train_loss)
        v = rnd.validations.values()
        mean = sum(s.accuracy * s.num_examples for s in v) / sum(s.num_examples for s in v)
        assert mean == pytest.approx(rnd.accuracy) and all(s.error is None for s in v)

    # No weights are read: the members' metrics come from the updates' metadata.
    def no_weights(*args, **kwargs):
        raise AssertionError(f"read weights: {args}")

    monkeypatch.setattr(Store, "get_update", no_weights)
    monkeypatch.setattr(Store, "get_model", no_weights)
    again = report.load(run_store, RUN)
    assert again.rounds[1].training == r.rounds[1].training


@pytest.mark.slow
def test_command_writes_the_page_and_pngs_and_prints_the_path(work_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.command(parser_args(RUN, "--work-dir", work_dir, "--out", out)) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == str(out / "report.html")
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    pngs = sorted(out.glob("*.png"))
    assert {p.stem for p in pngs} == {
        "global-accuracy", "global-loss", "member-train-loss", "member-train-accuracy",
        "member-validation-accuracy", "member-validation-loss", "participation", "round-times",
    }  # fmt: skip
    from matplotlib.image import imread

    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(p).shape[:2] == (420, 800)

    # The run defaults to the work dir's last; --no-png writes the page alone.
    default = work_dir / "reports" / RUN
    shutil.rmtree(default, ignore_errors=True)
    assert report.command(parser_args("--work-dir", work_dir, "--no-png")) == 0
    assert capsys.readouterr().out.strip() == str(default / "report.html")
    assert [p.name for p in default.iterdir()] == ["report.html"]


@pytest.mark.slow
def test_command_errors_are_one_clear_line(work_dir, tmp_path, capsys):
    assert report.command(parser_args("nope", "--work-dir", work_dir)) == 1
    err = capsys.readouterr().err
    assert err == f"error: run 'nope' is not in this store (runs in this store: {RUN})\n"
    assert report.command(parser_args(RUN, "--work-dir", tmp_path)) == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path.resolve()} is not an embedded alliance's work dir (no s3/)\n"
    )


@pytest.mark.slow
def test_pngs_are_skipped_with_a_warning_without_matplotlib(
    work_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    assert report.command(parser_args(RUN, "--work-dir", work_dir, "--out", tmp_path)) == 0
    captured = capsys.readouterr()
    assert "warning: no PNGs: matplotlib is not installed" in captured.err
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


@pytest.mark.slow
def test_each_member_keeps_one_colour_on_every_chart(real_report):
    colours: dict[str, set[str]] = {}
    charts = report.charts(real_report)
    for chart in charts:
        for s in chart.series:
            colours.setdefault(s.name, set()).add(s.colour)
        page = report.svg(chart)
        for s in chart.series:  # its points and its legend entry
            if chart.kind == "line":
                assert f'fill="{s.colour}" data-series="{s.name}"' in page
            assert f'data-series="{s.name}" transform=' in page
    assert colours["member-1"] != colours["member-2"]
    assert all(len(c) == 1 for c in colours.values()), colours
    assert sum("member-1" in [s.name for s in c.series] for c in charts) == 4


# --- the page in a browser ---------------------------------------------------------------


class _Dom(HTMLParser):
    """Each chart's data points, as the browser's DOM has them: svg id -> [(series, round,
    value)]; and every tag and attribute seen."""

    def __init__(self):
        super().__init__()
        self.charts: dict[str, list[tuple[str, int, str]]] = {}
        self.svg: str | None = None
        self.tags: set[str] = set()
        self.attrs: set[str] = set()
        self.titles: dict[str, str] = {}
        self._in_title: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.attrs.update(a)
        if tag == "svg":
            self.svg = a.get("id")
            self.charts[self.svg] = []
        elif self.svg and "data-value" in a:
            self.charts[self.svg].append((a["data-series"], int(a["data-round"]), a["data-value"]))
        elif tag == "title" and self.svg and a.get("id", "").endswith("-title"):
            self._in_title = self.svg

    def handle_endtag(self, tag):
        if tag == "svg":
            self.svg = None
        if tag == "title":
            self._in_title = None

    def handle_data(self, data):
        if self._in_title:
            self.titles[self._in_title] = self.titles.get(self._in_title, "") + data


def chromium(*args, timeout=90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", *args],
        capture_output=True,
        timeout=timeout,
    )


@pytest.mark.slow
@needs_chromium
def test_the_page_renders_in_chromium_with_every_chart_and_point(real_report, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(report.render_html(real_report), encoding="utf-8")
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    dom = chromium(profile, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr.decode()[-2000:]
    parsed = _Dom()
    parsed.feed(dom.stdout.decode())
    charts = report.charts(real_report)
    assert len(charts) == 8
    for chart in charts:
        points = parsed.charts.get(f"chart-{chart.id}")
        assert points is not None, f"{chart.id} is not in the DOM"
        assert parsed.titles[f"chart-{chart.id}"] == chart.title
        expected = [
            (s.name, x, f"{y:.{chart.digits}f}")
            for s in chart.series
            for x, y in s.points
            if chart.kind == "line" or y > 0  # a bar of 0 is not drawn
        ]
        assert points == expected, chart.id
    accuracy = parsed.charts["chart-global-accuracy"]
    assert [v for _, _, v in accuracy] == [f"{r.accuracy:.4f}" for r in real_report.rounds]
    assert "script" not in parsed.tags

    shot = tmp_path / "shot.png"
    result = chromium(profile, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri())
    assert result.returncode == 0 and shot.exists(), result.stderr.decode()[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (3000, 1200)
    flat = (pixels[..., :3] * 255).round().astype("uint8").reshape(-1, 3)
    import numpy as np

    distinct = len(np.unique(flat, axis=0))
    background = (flat == flat[0]).all(axis=1).mean()
    # A blank (or unstyled) page has a handful of colours; the charts' lines, bars and
    # anti-aliased text give hundreds.
    assert distinct > 200, distinct
    assert background < 0.95, background
    # The member colours are on screen.
    for colour in real_report.colours().values():
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype="uint8")
        assert (flat == rgb).all(axis=1).sum() > 50, colour


# --- hand-made records: hostile strings, bad values, runs without rounds -----------------


def _hostile_records(store: Store, run: str) -> None:
    reason = HOSTILE_REASON
    for n in (1, 2):
        store.put_round_record(
            run,
            n,
            {
                "round": n,
                "startedAt": 1000.0 + 10 * n,
                "aggregatedAt": 1006.0 + 10 * n,
                "finishedAt": 1008.0 + 10 * n,
                "accuracy": 0.5 + 0.1 * n,
                "loss": 1.0 / n,
                "trainLoss": 1.5 / n,
                "numExamples": 100,
                "validators": 1,
                "modelId": f"{n:064x}",
                "members": ["honest", HOSTILE_NAME],
                "dropped": ['late"one'],
                "failed": {"crashy": reason},
                "rejected": {"</svg><script>x()</script>": reason, HOSTILE_NAME: reason},
            },
        )
        store.put_update(
            run, n, HOSTILE_NAME, b"weights",
            {"numExamples": 50, "loss": 1.2 / n, "accuracy": 0.4 + 0.1 * n, "seconds": 2.0},
        )  # fmt: skip
        store.put_update(
            run, n, "honest", b"weights", {"numExamples": 50, "loss": "NaN", "accuracy": 7}
        )
        store.put_result(run, n, "validations", HOSTILE_NAME, {"error": reason})
        store.put_result(
            run, n, "validations", "honest", {"accuracy": 0.6, "numExamples": 20, "loss": 0.9}
        )
    store.put_run_spec(
        run, {"rounds": 3, "aggregator": "fedavg", "aggregatorParams": {"<b>": reason}}
    )
    store.put_run_status(
        run,
        {"phase": "Running", "round": 3, "stage": "Training", "message": reason, "history": []},
    )


def _check_escaped(page: str) -> None:
    assert "<script" not in page and "<img" not in page and "</svg><script" not in page
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; more" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    parsed = _Dom()
    parsed.feed(page)
    allowed = {
        "html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "p", "dl", "div",
        "dt", "dd", "span", "code", "figure", "figcaption", "svg", "desc", "rect", "text",
        "line", "g", "polyline", "circle", "table", "tr", "th", "td", "br", "b",
    }  # fmt: skip
    assert parsed.tags <= allowed, parsed.tags - allowed
    assert not [a for a in parsed.attrs if a.startswith("on")]


def test_hostile_strings_come_out_escaped(store):
    _hostile_records(store, "hostile")
    r = report.load(store, "hostile")
    assert [x.number for x in r.rounds] == [1, 2]
    assert (r.phase, r.current_round, r.rounds_planned) == ("Running", 3, 3)
    assert HOSTILE_NAME in r.members and "</svg><script>x()</script>" in r.members
    first = r.rounds[0]
    # Member-written numbers out of bounds are left out, not shown.
    assert first.training["honest"].loss is None and first.training["honest"].accuracy is None
    assert first.training[HOSTILE_NAME].accuracy == pytest.approx(0.5)
    assert first.validations[HOSTILE_NAME].error == HOSTILE_REASON
    page = report.render_html(r)
    _check_escaped(page)
    assert page.count("&lt;script&gt;alert(&quot;pwned&quot;)") >= 8  # reasons, message, params


def test_a_hand_made_report_escapes_its_run_name_and_survives_bad_values():
    bad = report.Round(
        number=1,
        members=[HOSTILE_NAME],
        rejected={"<script>": HOSTILE_REASON},
        training={HOSTILE_NAME: report.MemberTraining(num_examples=1, loss=0.5)},
        validations={"v": report.MemberValidation(error=HOSTILE_REASON)},
    )
    r = report.Report(run=HOSTILE_NAME, message=HOSTILE_REASON, rounds=[bad],
                      spec={"aggregator": "<script>"})  # fmt: skip
    page = report.render_html(r)
    _check_escaped(page)
    assert "<title>alliance report: &lt;img" in page
    # No rounds at all: a page that says so, still valid.
    empty = report.render_html(report.Report(run="empty"))
    assert "No round has finished yet" in empty and "<svg" not in empty


def test_unreadable_objects_are_left_out_not_raised(store):
    store.put_round_record("odd", 1, {"round": 1, "finishedAt": 5.0, "accuracy": 2.0,
                                      "members": "not a list", "rejected": ["x"]})  # fmt: skip
    store.put_bytes("runs/odd/rounds/00002/record.json", b"{not json")
    store.put_json("runs/odd/rounds/00003/record.json", [1, 2, 3])
    store.put_bytes("runs/odd/rounds/00001/validations/m.json", b"\xff\xfe")
    r = report.load(store, "odd")
    assert [x.number for x in r.rounds] == [1]
    only = r.rounds[0]
    assert (only.accuracy, only.members, only.rejected) == (None, [], {})
    assert only.validations["m"].error.startswith("unreadable")
    assert "<svg" in report.render_html(r)


def test_records_without_a_status_as_the_operator_keeps_them(store):
    """The operator keeps the status in the TrainingRun: the store has records and the spec;
    the caller may pass the status it holds."""
    for n in (1, 2):
        store.put_round_record("op-run-1a2b3c4d", n, {"round": n, "startedAt": 10.0 * n,
                               "finishedAt": 10.0 * n + 5, "accuracy": 0.9,
                               "modelId": "ab" * 32, "members": ["a", "b"]})  # fmt: skip
    store.put_run_spec("op-run-1a2b3c4d", {"rounds": 2, "aggregator": "median"})
    r = report.load(store, "op-run-1a2b3c4d")
    assert (r.phase, r.aggregator, len(r.rounds), r.model_id) == (
        "Completed",
        "median",
        2,
        "ab" * 32,
    )
    assert r.total_seconds == pytest.approx(15.0)
    given = report.load(
        store, "op-run-1a2b3c4d", status={"phase": "Failed", "message": "m", "conditions": []}
    )
    assert (given.phase, given.message) == ("Failed", "m")


def test_missing_runs_and_runs_without_rounds_are_clear_errors(
    store, monkeypatch, tmp_path, capsys
):
    with pytest.raises(report.RunNotFound, match=r"this store has no runs"):
        report.load(store, "absent")
    store.put_run_status(
        "waiting", {"phase": "Pending", "message": "waiting for members: 0 of 2 ready"}
    )
    store.put_run_spec("other", {"rounds": 1})
    with pytest.raises(report.RunNotFound) as info:
        report.load(store, "absent")
    assert (
        str(info.value) == "run 'absent' is not in this store (runs in this store: other, waiting)"
    )
    assert report.load(store, "waiting").rounds == []
    cfg = store.config
    for key, value in (("ENDPOINT", cfg.endpoint), ("ACCESS_KEY", cfg.access_key),
                       ("SECRET_KEY", cfg.secret_key)):  # fmt: skip
        monkeypatch.setenv(f"ALLIANCE_S3_{key}", value)
    monkeypatch.setenv("ALLIANCE_BUCKET", cfg.bucket)
    assert report.command(parser_args("waiting", "--out", tmp_path)) == 1
    assert capsys.readouterr().err == (
        "error: run 'waiting' has no finished round yet: "
        "Pending, waiting for members: 0 of 2 ready\n"
    )
    assert report.command(parser_args("absent", "--out", tmp_path)) == 1
    assert "runs in this store: other, waiting" in capsys.readouterr().err
    monkeypatch.delenv("ALLIANCE_BUCKET")
    assert report.command(parser_args("waiting")) == 1
    assert "ALLIANCE_BUCKET" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# --- pieces --------------------------------------------------------------------------------


def test_ticks_are_round_numbers_that_cover_the_data():
    assert report.nice_ticks(0.7275, 0.86) == pytest.approx([0.7, 0.75, 0.8, 0.85, 0.9])
    assert report.nice_ticks(0, 8.7) == pytest.approx([0, 2, 4, 6, 8, 10])
    assert report.nice_ticks(3, 3) == pytest.approx([2.6, 2.8, 3.0, 3.2, 3.4])
    assert report.round_ticks([1, 2]) == [1, 2]
    assert report.round_ticks(list(range(1, 101))) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert report.round_ticks(list(range(1, 38))) == [5, 10, 15, 20, 25, 30, 35]


def test_colours_stay_distinct_for_many_members():
    colours = [report.member_colour(i) for i in range(40)]
    assert len(set(colours)) == 40
    assert all(len(c) == 7 and c.startswith("#") for c in colours)


def test_the_module_imports_nothing_heavy():
    """The operator's image has neither matplotlib nor TensorFlow, and `alliance --help` builds
    the report's parser: at module level the report imports only the standard library."""
    import ast

    tree = ast.parse(Path(report.__file__).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top.add(node.module)
    assert {m for m in top if m.split(".")[0] not in sys.stdlib_module_names} == {"alliance"}
    code = (
        "import sys, alliance.report\n"
        "heavy = ('matplotlib', 'tensorflow', 'keras', 'pandas', 'numpy', 'minio', 'kopf',\n"
        "         'alliance.store', 'alliance.s3server')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
