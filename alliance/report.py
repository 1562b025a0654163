"""A run's report: one self-contained HTML page (and PNG charts) from the store alone.

``alliance report RUN`` reads what a run left in the store (every round's record,
``runs/<run>/rounds/NNNNN/record.json``; the members' update metrics and validation scores;
the pinned spec and, for the embedded runner and ``alliance coordinate``, the status) and
writes ``report.html``: a summary, inline SVG charts drawn here in pure Python (global
accuracy and loss, each member's training and validation metrics, who took part, was rejected,
failed or was dropped, and each round's wall time) and a table of the rounds. Nothing on the
page loads anything: no network, no script (its Content-Security-Policy forbids both).

    load(store, run[, status]) -> Report     everything the page needs, from the store
    render_html(report) -> str               the page
    write_pngs(report, out_dir) -> [Path]    the same charts as PNG (matplotlib, Agg)

At module level this module imports only the standard library (``alliance.store`` where it is
used, so that building the ``alliance`` command's parser stays fast): the Kubernetes operator
(no matplotlib, no TensorFlow in its image) calls ``load`` and ``render_html`` with the
TrainingRun's ``status.storeRun`` and ``status``; matplotlib is imported by ``write_pngs``.

Whatever a member wrote (its name, its reasons, its metrics) is bounded here again and every
string is escaped on the page, though the coordinator bounded most of it already.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alliance import __version__

if TYPE_CHECKING:  # the store (numpy, minio) is imported where it is used: `alliance --help`
    from alliance.store import Store  # builds this command's parser and stays fast

#: Longest string kept from a record or a member (characters), and longest name shown.
#: Where a finished run's page is kept in the store (alliance.driver.store_report).
REPORT_KEY = "runs/{run}/report.html"

MAX_TEXT = 500
MAX_NAME = 120
#: Largest member-written JSON read (a validation score), as the coordinator reads it.
MAX_MEMBER_JSON = 64 * 1024
#: Largest round record read (the coordinator writes a few hundred bytes per member).
MAX_RECORD = 4 * 2**20
#: Validation scores read per round, at most (anyone with a key may add some).
MAX_VALIDATIONS = 1000

# Member colours (Tableau 10), then evenly spread hues; a member keeps its colour on every chart.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#3b3b98",
)
GLOBAL_COLOURS = {"validation": "#1b1b1b", "training": "#7a7a7a"}
OUTCOME_COLOURS = {
    "aggregated": "#59a14f",
    "rejected": "#e15759",
    "failed": "#f28e2b",
    "dropped": "#9c9c9c",
}
STAGE_COLOURS = {"training": "#4e79a7", "aggregation and validation": "#f28e2b"}


class ReportError(ValueError):
    """A report that cannot be made; the message says why, in one line."""


class RunNotFound(ReportError):
    def __init__(self, run: str, runs: list[str]):
        self.run, self.runs = run, runs
        known = f"runs in this store: {', '.join(runs)}" if runs else "this store has no runs"
        super().__init__(f"run {run!r} is not in this store ({known})")


class NoRounds(ReportError):
    def __init__(self, run: str, phase: str, message: str):
        why = f": {phase}, {message}" if message else (f": {phase}" if phase else "")
        super().__init__(f"run {run!r} has no finished round yet{why}")


# --- what the page shows ------------------------------------------------------------------


@dataclass
class MemberTraining:
    """A member's metrics for its update in a round, as it reported them (bounded)."""

    num_examples: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    seconds: float | None = None


@dataclass
class MemberValidation:
    """A validator's score of a round's model, or the error it reported."""

    accuracy: float | None = None
    loss: float | None = None
    num_examples: int | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass
class Round:
    number: int
    started_at: float = 0.0
    aggregated_at: float = 0.0
    finished_at: float = 0.0
    accuracy: float | None = None  # the validators' example-weighted mean
    loss: float | None = None
    train_loss: float | None = None  # the aggregated updates' example-weighted mean
    num_examples: int = 0
    validators: int = 0
    model_id: str | None = None
    members: list[str] = field(default_factory=list)  # whose updates were aggregated
    dropped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    train_seconds: float = 0.0
    validation_seconds: float = 0.0
    aggregation_seconds: float = 0.0
    update_bytes: int = 0
    training: dict[str, MemberTraining] = field(default_factory=dict)
    validations: dict[str, MemberValidation] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return max(0.0, self.finished_at - self.started_at) if self.finished_at else 0.0

    @property
    def training_stage_seconds(self) -> float:
        end = self.aggregated_at or self.finished_at
        return max(0.0, end - self.started_at) if end else 0.0


@dataclass
class Report:
    run: str
    phase: str = ""  # "" when the store holds no status (the operator keeps it in the resource)
    message: str = ""
    rounds_planned: int | None = None
    rounds: list[Round] = field(default_factory=list)
    spec: dict = field(default_factory=dict)
    current_round: int = 0  # the round in progress (status), 0 when none or unknown
    stage: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    model_id: str | None = None
    generated_at: float = 0.0

    @property
    def aggregator(self) -> str:
        return _text(self.spec.get("aggregator") or "", 60)

    @property
    def aggregator_params(self) -> dict:
        params = self.spec.get("aggregatorParams")
        return params if isinstance(params, dict) else {}

    @property
    def members(self) -> list[str]:
        """Everyone the run's records or scores name, sorted: the colour order."""
        names: set[str] = set()
        for r in self.rounds:
            names.update(r.members, r.dropped, r.failed, r.rejected, r.training, r.validations)
        return sorted(names)

    @property
    def final_accuracy(self) -> float | None:
        return next((r.accuracy for r in reversed(self.rounds) if r.accuracy is not None), None)

    @property
    def total_seconds(self) -> float:
        start = self.started_at or min((r.started_at for r in self.rounds), default=0.0)
        end = self.finished_at or max((r.finished_at for r in self.rounds), default=0.0)
        return max(0.0, end - start) if start and end else 0.0

    def colours(self) -> dict[str, str]:
        return {name: member_colour(i) for i, name in enumerate(self.members)}


def member_colour(index: int) -> str:
    if index < len(PALETTE):
        return PALETTE[index]
    hue = (index * 137.508) % 360  # the golden angle: neighbours differ most
    return _hsl_hex(hue, 0.55, 0.45 if index % 2 else 0.6)


# --- loading ------------------------------------------------------------------------------


def load(store: Store, run: str, status: dict | None = None) -> Report:
    """Everything the page needs, from the store only. ``status``: the run's status as a
    dict (camelCase, as ``RunStatus.to_dict`` or a TrainingRun's ``.status``) when the caller
    holds it; else ``runs/<run>/status.json`` when there is one. Raises RunNotFound when the
    store has nothing of the run."""
    prefix = f"runs/{run}/"
    listing = [o.key for o in store.list(prefix)] if run and "/" not in run else []
    if status is None:
        status = _json(store, prefix + "status.json", MAX_RECORD)
    if not listing and not status:
        raise RunNotFound(run, runs_in(store))
    status = status if isinstance(status, dict) else {}
    spec = _json(store, prefix + "spec.json", MAX_MEMBER_JSON)
    spec = spec if isinstance(spec, dict) else {}

    records, updates, validations = _round_keys(listing, prefix)
    numbers = sorted(records)
    found = store.map(lambda n: _json(store, records[n], MAX_RECORD), numbers)
    rounds = {n: _round(n, rec) for n, rec in zip(numbers, found, strict=True) if _is_dict(rec)}
    # Rounds the status still holds but the store has no record of (a run from before records
    # were kept): finished ones only.
    for rec in status.get("history") or []:
        n = _int(rec.get("round")) if isinstance(rec, dict) else None
        if n and n not in rounds and _num(rec.get("finishedAt")):
            rounds[n] = _round(n, rec)
    ordered = [rounds[n] for n in sorted(rounds)]
    _member_metrics(store, run, ordered, updates, validations)

    phase = _text(status.get("phase") or "", 40)
    planned = _int(spec.get("rounds"))
    if not phase and ordered and planned and ordered[-1].number >= planned:
        phase = "Completed" if ordered[-1].model_id else "Failed"
    return Report(
        run=run,
        phase=phase,
        message=_text(status.get("message") or ""),
        rounds_planned=planned,
        rounds=ordered,
        spec=spec,
        current_round=_int(status.get("round")) or 0,
        stage=_text(status.get("stage") or "", 40),
        started_at=_num(status.get("startedAt")) or 0.0,
        finished_at=_num(status.get("finishedAt")) or 0.0,
        model_id=_text(status.get("modelId") or "", 80)
        or next((r.model_id for r in reversed(ordered) if r.model_id), None),
        generated_at=time.time(),
    )


def write_html(store: Store, run: str, out_dir: Path, status: dict | None = None) -> Path:
    """OUT/report.html for ``run``; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "report.html"
    page.write_text(render_html(load(store, run, status)), encoding="utf-8")
    return page


def runs_in(store: Store) -> list[str]:
    """The names of the runs the store holds objects of."""
    return sorted({o.key.split("/")[1] for o in store.list("runs/") if o.key.count("/") >= 2})


def _round_keys(keys: Iterable[str], prefix: str):
    """From the run's listing: round -> record key; (round, member) with an update or a
    validation score."""
    records: dict[int, str] = {}
    updates: set[tuple[int, str]] = set()
    validations: dict[int, list[str]] = {}
    for key in keys:
        parts = key[len(prefix) :].split("/", 3)
        if len(parts) < 3 or parts[0] != "rounds" or not parts[1].isdigit():
            continue
        n = int(parts[1])
        if parts[2] == "record.json":
            records[n] = key
        elif len(parts) == 4 and parts[2] == "updates" and parts[3].endswith(".npz"):
            updates.add((n, parts[3][: -len(".npz")]))
        elif len(parts) == 4 and parts[2] == "validations" and parts[3].endswith(".json"):
            validations.setdefault(n, []).append(parts[3][: -len(".json")])
    return records, updates, validations


def _round(n: int, rec: dict) -> Round:
    return Round(
        number=n,
        started_at=_num(rec.get("startedAt")) or 0.0,
        aggregated_at=_num(rec.get("aggregatedAt")) or 0.0,
        finished_at=_num(rec.get("finishedAt")) or 0.0,
        accuracy=_num(rec.get("accuracy"), 0.0, 1.0),
        loss=_num(rec.get("loss")),
        train_loss=_num(rec.get("trainLoss")),
        num_examples=_int(rec.get("numExamples")) or 0,
        validators=_int(rec.get("validators")) or 0,
        model_id=_text(rec.get("modelId"), 80) if rec.get("modelId") else None,
        members=_names(rec.get("members")),
        dropped=_names(rec.get("dropped")),
        failed=_reasons(rec.get("failed")),
        rejected=_reasons(rec.get("rejected")),
        train_seconds=_num(rec.get("trainSeconds")) or 0.0,
        validation_seconds=_num(rec.get("validationSeconds")) or 0.0,
        aggregation_seconds=_num(rec.get("aggregationSeconds")) or 0.0,
        update_bytes=_int(rec.get("updateBytes")) or 0,
    )


def _member_metrics(store: Store, run: str, rounds: list[Round], updates, validations) -> None:
    """Each aggregated member's training metrics (from its update's metadata: no weights are
    read) and each validator's score, read concurrently."""
    asks: list[tuple[Round, str, str]] = []
    for r in rounds:
        for m in r.members:
            if (r.number, m) in updates:
                asks.append((r, "update", m))
        for m in sorted(validations.get(r.number, []))[:MAX_VALIDATIONS]:
            asks.append((r, "validation", m))

    def fetch(ask: tuple[Round, str, str]) -> Any:
        r, kind, member = ask
        if kind == "update":
            return update_metrics(store, run, r.number, member)
        key = f"runs/{run}/rounds/{r.number:05d}/validations/{member}.json"
        return _json(store, key, MAX_MEMBER_JSON, unusable=True)

    for (r, kind, member), got in zip(asks, store.map(fetch, asks), strict=True):
        name = _text(member, MAX_NAME)
        if kind == "update":
            if got is not None:
                r.training[name] = got
        elif got is not None:
            r.validations[name] = _validation(got)


def update_metrics(store: Store, run: str, round_: int, member: str) -> MemberTraining | None:
    """A member's update metrics, from the object's metadata alone (one HEAD, no weights)."""
    meta = store.get_update_meta(run, round_, member, max_bytes=MAX_MEMBER_JSON)
    if not isinstance(meta, dict):
        return None
    return MemberTraining(
        num_examples=_int(meta.get("numExamples")),
        loss=_num(meta.get("loss")),
        accuracy=_num(meta.get("accuracy"), 0.0, 1.0),
        seconds=_num(meta.get("seconds")),
    )


def _validation(content: Any) -> MemberValidation:
    if isinstance(content, _Unusable):
        return MemberValidation(error=f"unreadable: {content.why}")
    if not isinstance(content, dict):
        return MemberValidation(error=f"not a JSON object ({type(content).__name__})")
    if "error" in content:
        return MemberValidation(error=_text(content["error"]))
    accuracy = _num(content.get("accuracy"), 0.0, 1.0)
    if accuracy is None:
        return MemberValidation(error="no usable accuracy")
    return MemberValidation(
        accuracy=accuracy,
        loss=_num(content.get("loss")),
        num_examples=_int(content.get("numExamples")),
        seconds=_num(content.get("seconds")),
    )


@dataclass(frozen=True)
class _Unusable:
    why: str


def _json(store: Store, key: str, max_bytes: int, unusable: bool = False) -> Any:
    from alliance.store import BadObject

    try:
        return store.get_json(key, max_bytes=max_bytes, attempts=3)
    except BadObject as exc:
        return _Unusable(_text(str(exc), 200)) if unusable else None


# --- bounded values from the store --------------------------------------------------------


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def _num(value: Any, low: float = 0.0, high: float = math.inf) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and low <= value <= high else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**53:
        return None
    return value


def _text(value: Any, limit: int = MAX_TEXT) -> str:
    s = value if isinstance(value, str) else json.dumps(value, default=repr)
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _names(value: Any) -> list[str]:
    return [_text(v, MAX_NAME) for v in value] if isinstance(value, list) else []


def _reasons(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {_text(k, MAX_NAME): _text(v) for k, v in value.items()}


# --- charts: one description, drawn as SVG here and as PNG by matplotlib -------------------


@dataclass
class Series:
    name: str
    colour: str
    points: list[tuple[int, float]]  # (round, value)
    dashed: bool = False


@dataclass
class Chart:
    id: str
    title: str
    y_label: str
    series: list[Series]
    kind: str = "line"  # "line", or "bar": the series stacked per round
    digits: int = 4  # decimals of the values in point labels
    y_min: float | None = None  # fixed bounds (else from the data)
    y_max: float | None = None
    note: str = ""

    @property
    def desc(self) -> str:
        parts = []
        for s in self.series:
            values = ", ".join(f"round {x}: {y:.{self.digits}f}" for x, y in s.points)
            parts.append(f"{s.name}: {values or 'no values'}")
        return f"{self.title}, by round. " + "; ".join(parts)


def charts(report: Report) -> list[Chart]:
    """The charts of a report, in page order; charts without data are left out."""
    colours = report.colours()
    rounds = report.rounds
    out: list[Chart] = []

    def points(get: Callable[[Round], float | None]) -> list[tuple[int, float]]:
        return [(r.number, v) for r in rounds if (v := get(r)) is not None]

    def per_member(get: Callable[[Round, str], float | None]) -> list[Series]:
        series = []
        for name in report.members:
            pts = [(r.number, v) for r in rounds if (v := get(r, name)) is not None]
            if pts:
                series.append(Series(name, colours[name], pts))
        return series

    acc = points(lambda r: r.accuracy)
    if acc:
        out.append(
            Chart(
                "global-accuracy",
                "Global model accuracy",
                "accuracy",
                [Series("validation accuracy", GLOBAL_COLOURS["validation"], acc)],
                y_max=1.0,
                note="the validators' example-weighted mean accuracy of each round's model",
            )
        )
    loss = [
        Series("validation loss", GLOBAL_COLOURS["validation"], points(lambda r: r.loss)),
        Series(
            "training loss",
            GLOBAL_COLOURS["training"],
            points(lambda r: r.train_loss),
            dashed=True,
        ),
    ]
    if any(s.points for s in loss):
        out.append(
            Chart(
                "global-loss",
                "Global loss",
                "loss",
                [s for s in loss if s.points],
                note="validation: the validators' weighted mean on the round's model; "
                "training: the aggregated updates' weighted mean",
            )
        )

    def trained(attr: str) -> Callable[[Round, str], float | None]:
        return lambda r, m: getattr(r.training[m], attr) if m in r.training else None

    def validated(attr: str) -> Callable[[Round, str], float | None]:
        return lambda r, m: getattr(r.validations[m], attr) if m in r.validations else None

    for cid, title, label, get, top in (
        ("member-train-loss", "Training loss by member", "loss", trained("loss"), None),
        (
            "member-train-accuracy",
            "Training accuracy by member",
            "accuracy",
            trained("accuracy"),
            1.0,
        ),
        (
            "member-validation-accuracy",
            "Validation accuracy by member",
            "accuracy",
            validated("accuracy"),
            1.0,
        ),
        ("member-validation-loss", "Validation loss by member", "loss", validated("loss"), None),
    ):
        series = per_member(get)
        if series:
            out.append(Chart(cid, title, label, series, y_max=top))

    if rounds:
        outcomes = {
            "aggregated": lambda r: len(r.members),
            "rejected": lambda r: len(r.rejected),
            "failed": lambda r: len(r.failed),
            "dropped": lambda r: len(r.dropped),
        }
        out.append(
            Chart(
                "participation",
                "Members per round",
                "members",
                [
                    Series(k, OUTCOME_COLOURS[k], [(r.number, float(get(r))) for r in rounds])
                    for k, get in outcomes.items()
                ],
                kind="bar",
                digits=0,
                y_min=0.0,
                note="aggregated, rejected (update or score refused), failed (reported), "
                "dropped (no answer, or lost)",
            )
        )
        out.append(
            Chart(
                "round-times",
                "Round wall time",
                "seconds",
                [
                    Series(
                        "training",
                        STAGE_COLOURS["training"],
                        [(r.number, r.training_stage_seconds) for r in rounds],
                    ),
                    Series(
                        "aggregation and validation",
                        STAGE_COLOURS["aggregation and validation"],
                        [(r.number, r.seconds - r.training_stage_seconds) for r in rounds],
                    ),
                ],
                kind="bar",
                digits=1,
                y_min=0.0,
                note="from the round's start to the last update in, then to its end",
            )
        )
    return out


# --- SVG ------------------------------------------------------------------------------------

W, H = 640, 300  # the plot's box, in SVG units (the legend goes below)
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 40, 46


def svg(chart: Chart) -> str:
    """One chart as inline SVG: axes with ticks and labels, a legend, a title and a
    description for screen readers, a circle (or a bar) per value carrying its data."""
    e = _esc
    xs = sorted({x for s in chart.series for x, _ in s.points})
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    if chart.kind == "bar":
        tops = [sum(v for s in chart.series for x2, v in s.points if x2 == x) for x in xs]
        values = [0.0, *tops]
    else:
        values = [v for s in chart.series for _, v in s.points]
    lo, hi = min(values, default=0.0), max(values, default=1.0)
    if chart.y_min is not None:
        lo = min(lo, chart.y_min)
    yticks = nice_ticks(lo, hi)
    y0, y1 = yticks[0], yticks[-1]
    if chart.y_max is not None and y1 > chart.y_max >= hi:
        yticks = [t for t in yticks if t <= chart.y_max + 1e-12]
        y1 = chart.y_max
        if yticks[-1] < y1:
            yticks.append(y1)
    x0, x1 = (xs[0], xs[-1]) if xs else (1, 1)
    pad = 0.5 if chart.kind == "bar" or x0 == x1 else 0.0
    x0, x1 = x0 - pad, x1 + pad

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return TOP + plot_h - (y - y0) / (y1 - y0) * plot_h

    legend, legend_h = _legend(chart.series, H, bars=chart.kind == "bar")
    cid = e(chart.id)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="chart-{cid}" class="chart" '
        f'viewBox="0 0 {W} {H + legend_h}" role="img" '
        f'aria-labelledby="chart-{cid}-title chart-{cid}-desc" data-kind="{e(chart.kind)}">',
        f'<title id="chart-{cid}-title">{e(chart.title)}</title>',
        f'<desc id="chart-{cid}-desc">{e(chart.desc)}</desc>',
        f'<rect x="0" y="0" width="{W}" height="{H + legend_h}" fill="#ffffff"/>',
        f'<text x="{W / 2}" y="24" text-anchor="middle" class="ctitle">{e(chart.title)}</text>',
    ]
    # grid and y ticks
    for t in yticks:
        y = py(t)
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" class="grid"/>'
            f'<line x1="{LEFT - 5}" y1="{y:.1f}" x2="{LEFT}" y2="{y:.1f}" class="axis"/>'
            f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
            f"{e(_tick_label(t, yticks))}</text>"
        )
    # x ticks: rounds
    for t in round_ticks(xs):
        x = px(t)
        parts.append(
            f'<line x1="{x:.1f}" y1="{TOP + plot_h}" x2="{x:.1f}" y2="{TOP + plot_h + 5}" '
            f'class="axis"/><text x="{x:.1f}" y="{TOP + plot_h + 19}" text-anchor="middle" '
            f'class="tick">{t}</text>'
        )
    parts.append(
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" class="axis"/>'
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{W - RIGHT}" y2="{TOP + plot_h}" '
        f'class="axis"/>'
        f'<text x="{LEFT + plot_w / 2}" y="{H - 8}" text-anchor="middle" class="alabel">'
        f"round</text>"
        f'<text x="16" y="{TOP + plot_h / 2}" text-anchor="middle" class="alabel" '
        f'transform="rotate(-90 16 {TOP + plot_h / 2})">{e(chart.y_label)}</text>'
    )
    if chart.kind == "bar":
        parts.extend(_bars(chart, xs, px, py, plot_w))
    else:
        parts.extend(_lines(chart, px, py))
    parts.append(legend)
    parts.append("</svg>")
    return "\n".join(parts)


def _lines(chart: Chart, px, py) -> list[str]:
    e = _esc
    out = []
    for s in chart.series:
        name, colour = e(s.name), e(s.colour)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(f'<g class="series" data-series="{name}">')
        # a line through consecutive rounds; a missing round breaks it
        run: list[tuple[int, float]] = []
        for point in [*s.points, None]:
            if point is not None and (not run or point[0] == run[-1][0] + 1):
                run.append(point)
                continue
            if len(run) > 1:
                coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in run)
                out.append(
                    f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                    f'stroke-width="2"{dash}/>'
                )
            run = [point] if point is not None else []
        for x, y in s.points:
            value = f"{y:.{chart.digits}f}"
            out.append(
                f'<circle class="pt" cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{colour}" '
                f'data-series="{name}" data-round="{x}" data-value="{value}">'
                f"<title>{name}, round {x}: {value}</title></circle>"
            )
        out.append("</g>")
    return out


def _bars(chart: Chart, xs: list[int], px, py, plot_w: float) -> list[str]:
    e = _esc
    width = min(48.0, 0.7 * plot_w / max(1, len(xs)))
    base = {x: 0.0 for x in xs}
    out = []
    for s in chart.series:
        name, colour = e(s.name), e(s.colour)
        out.append(f'<g class="series" data-series="{name}">')
        for x, v in s.points:
            value = f"{v:.{chart.digits}f}"
            if v > 0:
                top, bottom = py(base[x] + v), py(base[x])
                out.append(
                    f'<rect class="bar" x="{px(x) - width / 2:.1f}" y="{top:.1f}" '
                    f'width="{width:.1f}" height="{max(0.5, bottom - top):.1f}" fill="{colour}" '
                    f'data-series="{name}" data-round="{x}" data-value="{value}">'
                    f"<title>{name}, round {x}: {value}</title></rect>"
                )
            base[x] += v
        out.append("</g>")
    return out


def _legend(series: list[Series], y_top: float, bars: bool = False) -> tuple[str, int]:
    e = _esc
    items, x, y, row_h = [], LEFT, 0, 20
    for s in series:
        width = 46 + 8 * len(s.name)
        if x + width > W - RIGHT and x > LEFT:
            x, y = LEFT, y + row_h
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        c = e(s.colour)
        swatch = (
            f'<rect x="3" y="1" width="14" height="14" fill="{c}"/>'
            if bars
            else f'<line x1="0" y1="8" x2="20" y2="8" stroke="{c}" stroke-width="3"{dash}/>'
            f'<circle cx="10" cy="8" r="4" fill="{c}"/>'
        )
        items.append(
            f'<g class="legend-item" data-series="{e(s.name)}" '
            f'transform="translate({x} {y_top + y})">{swatch}'
            f'<text x="26" y="12" class="tick">{e(s.name)}</text></g>'
        )
        x += width
    return f'<g class="legend">{"".join(items)}</g>', y + row_h + 8


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2, 2.5 or 5 times a power of ten."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-12:
        spread = abs(hi) * 0.1 or 1.0
        lo, hi = lo - spread, hi + spread
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, max(last, first + 1) + 1)]


def round_ticks(xs: list[int], count: int = 10) -> list[int]:
    """Whole rounds to label on the x axis: every round, or every 2nd, 5th, 10th..."""
    if not xs:
        return []
    lo, hi = xs[0], xs[-1]
    step = next(m * 10**p for p in range(12) for m in (1, 2, 5) if (hi - lo) / (m * 10**p) <= count)
    first = -(-lo // step) * step if step > 1 else lo
    return list(range(first, hi + 1, step)) or [lo]


def _tick_label(t: float, ticks: list[float]) -> str:
    """A tick's value with the fewest decimals that show every tick exactly."""
    decimals = next((d for d in range(7) if all(abs(round(v, d) - v) < 1e-9 for v in ticks)), 6)
    return f"{t:.{decimals}f}"


# --- the page -------------------------------------------------------------------------------

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 color:#1b1b1b;background:#f6f6f4;margin:0}
main{max-width:1080px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 10px}
.sub{color:#555;margin:0 0 18px}
.summary{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px;
 margin:0 0 8px;padding:0}
.summary div{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 12px}
.summary dt{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#666}
.summary dd{margin:2px 0 0;font-size:18px;font-weight:600;overflow-wrap:anywhere}
.phase-Completed{color:#2e7d32}.phase-Failed{color:#c62828}.phase-Running{color:#1565c0}
.message{color:#444;margin:8px 0 0}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:16px}
figure{background:#fff;border:1px solid #ddd;border-radius:6px;margin:0;padding:8px}
figcaption{color:#555;font-size:13px;padding:0 8px 6px}
svg.chart{width:100%;height:auto;display:block}
svg .ctitle{font-size:18px;font-weight:600;fill:#1b1b1b}
svg .tick{font-size:13px;fill:#333}svg .alabel{font-size:14px;fill:#333}
svg .grid{stroke:#e6e6e6;stroke-width:1}svg .axis{stroke:#333;stroke-width:1}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border:1px solid #ddd;padding:5px 7px;text-align:right;vertical-align:top}
th{background:#efefec}td.l,th.l{text-align:left}
td.why{text-align:left;overflow-wrap:anywhere;max-width:360px}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}
.muted{color:#777}table.spec{width:auto}code{font-size:12px}
"""


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page: no network, no script."""
    e = _esc
    colours = report.colours()
    planned = report.rounds_planned
    done = len(report.rounds)
    final = report.final_accuracy
    params = report.aggregator_params
    aggregator = report.aggregator or "—"
    if params:
        aggregator += (
            " (" + ", ".join(f"{_text(k, 60)}={_text(v, 60)}" for k, v in params.items()) + ")"
        )
    phase = report.phase or "unknown"
    if report.phase == "Running" and report.current_round:
        phase += f" (round {report.current_round}, {report.stage or 'starting'})"
    cards = [
        ("Run", report.run),
        ("Phase", phase),
        ("Rounds done", f"{done} of {planned}" if planned else str(done)),
        ("Final accuracy", f"{final:.4f}" if final is not None else "—"),
        ("Aggregator", aggregator),
        ("Members", str(len(report.members))),
        ("Total time", _duration(report.total_seconds)),
        (
            "Started",
            _when(report.started_at or min((r.started_at for r in report.rounds), default=0)),
        ),
        ("Finished", _when(report.finished_at) if report.phase in ("Completed", "Failed") else "—"),
    ]
    summary = "".join(
        f"<div><dt>{e(k)}</dt><dd{_phase_class(report.phase) if k == 'Phase' else ''}>"
        f"{e(v)}</dd></div>"
        for k, v in cards
    )
    figures = []
    for chart in charts(report):
        caption = f"<figcaption>{e(chart.note)}</figcaption>" if chart.note else ""
        figures.append(f'<figure id="fig-{e(chart.id)}">{svg(chart)}{caption}</figure>')
    if not figures:
        figures.append('<p class="muted">No round has finished yet: nothing to chart.</p>')
    members = " ".join(
        f'<span class="member"><span class="sw" style="background:{e(colours[m])}"></span>'
        f"{e(m)}</span>"
        for m in report.members
    )
    spec_rows = "".join(
        f'<tr><th class="l">{e(_text(k, 60))}</th><td class="l"><code>'
        f"{e(_text(v, 200))}</code></td></tr>"
        for k, v in sorted(report.spec.items())
    )
    model = f"<code>{e(report.model_id)}</code>" if report.model_id else "—"
    generated = (
        f"Federated training report · generated {_when(report.generated_at)} "
        f"by alliance {__version__}"
    )
    spec_table = (
        f'<table class="spec">{spec_rows}</table>'
        if spec_rows
        else '<p class="muted">The store holds no spec for this run.</p>'
    )
    title = f"alliance report: {report.run}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<h1>Run {e(report.run)}</h1>
<p class="sub">{e(generated)}</p>
<dl class="summary">{summary}</dl>
{f'<p class="message">{e(report.message)}</p>' if report.message else ""}
<p class="message">Members: {members or '<span class="muted">none</span>'}</p>
<p class="message">Final model: {model}</p>
<h2>Charts</h2>
<div class="charts">{"".join(figures)}</div>
<h2>Rounds</h2>
{_rounds_table(report)}
<h2>Members</h2>
{_members_table(report, colours)}
<h2>Run spec</h2>
{spec_table}
</main>
</body>
</html>
"""


def _rounds_table(report: Report) -> str:
    e = _esc
    if not report.rounds:
        return '<p class="muted">No round has finished yet.</p>'
    head = (
        "<tr><th>round</th><th>seconds</th><th>aggregated</th><th>examples</th>"
        "<th>train loss</th><th>accuracy</th><th>loss</th><th>validators</th>"
        '<th class="l">dropped</th><th class="l">failed</th><th class="l">rejected</th>'
        '<th class="l">model</th></tr>'
    )
    rows = []
    for r in report.rounds:
        rows.append(
            f'<tr id="round-{r.number}"><td>{r.number}</td><td>{r.seconds:.1f}</td>'
            f"<td>{len(r.members)}</td><td>{r.num_examples}</td><td>{_f(r.train_loss)}</td>"
            f"<td>{_f(r.accuracy)}</td><td>{_f(r.loss)}</td><td>{r.validators}</td>"
            f'<td class="why">{e(", ".join(r.dropped)) or "—"}</td>'
            f'<td class="why">{_why(r.failed)}</td><td class="why">{_why(r.rejected)}</td>'
            f'<td class="l"><code>{e((r.model_id or "—")[:12])}</code></td></tr>'
        )
    return f'<table class="rounds">{head}{"".join(rows)}</table>'


def _members_table(report: Report, colours: dict[str, str]) -> str:
    e = _esc
    if not report.members:
        return '<p class="muted">No member took part yet.</p>'
    head = (
        '<tr><th class="l">member</th><th>aggregated</th><th>rejected</th><th>failed</th>'
        "<th>dropped</th><th>last train loss</th><th>last train accuracy</th>"
        "<th>last validation accuracy</th></tr>"
    )
    rows = []
    for m in report.members:
        rs = report.rounds
        trained = [r.training[m] for r in rs if m in r.training]
        scored = [r.validations[m] for r in rs if m in r.validations]
        last_val = next((v.accuracy for v in reversed(scored) if v.accuracy is not None), None)
        rows.append(
            f'<tr><td class="l"><span class="sw" style="background:{e(colours[m])}"></span>'
            f"{e(m)}</td><td>{sum(m in r.members for r in rs)}</td>"
            f"<td>{sum(m in r.rejected for r in rs)}</td><td>{sum(m in r.failed for r in rs)}</td>"
            f"<td>{sum(m in r.dropped for r in rs)}</td>"
            f"<td>{_f(trained[-1].loss if trained else None)}</td>"
            f"<td>{_f(trained[-1].accuracy if trained else None)}</td>"
            f"<td>{_f(last_val)}</td></tr>"
        )
    return f'<table class="members">{head}{"".join(rows)}</table>'


def _why(reasons: dict[str, str]) -> str:
    if not reasons:
        return "—"
    return "<br>".join(f"<b>{_esc(m)}</b>: {_esc(why)}" for m, why in reasons.items())


def _phase_class(phase: str) -> str:
    return f' class="phase-{phase}"' if phase in ("Completed", "Failed", "Running") else ""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _f(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    if not seconds:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _when(epoch: float) -> str:
    if not epoch:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _hsl_hex(hue: float, sat: float, light: float) -> str:
    import colorsys

    r, g, b = colorsys.hls_to_rgb(hue / 360, light, sat)
    return "#{:02x}{:02x}{:02x}".format(*(round(c * 255) for c in (r, g, b)))


# --- PNG --------------------------------------------------------------------------------------


def write_pngs(report: Report, out_dir: Path) -> list[Path]:
    """The report's charts as PNG files (``<chart id>.png``), drawn by matplotlib (Agg)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ReportError(
            "matplotlib is not installed (pip install 'alliance[report]'); "
            "the HTML report has the same charts"
        ) from exc
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for chart in charts(report):
        fig = Figure(figsize=(8, 4.2), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        if chart.kind == "bar":
            xs = sorted({x for s in chart.series for x, _ in s.points})
            base = dict.fromkeys(xs, 0.0)
            for s in chart.series:
                vals = dict(s.points)
                heights = [vals.get(x, 0.0) for x in xs]
                ax.bar(xs, heights, bottom=[base[x] for x in xs], color=s.colour, label=s.name)
                for x in xs:
                    base[x] += vals.get(x, 0.0)
        else:
            for s in chart.series:
                ax.plot(
                    [x for x, _ in s.points],
                    [y for _, y in s.points],
                    color=s.colour,
                    marker="o",
                    linestyle="--" if s.dashed else "-",
                    label=s.name,
                )
        ax.set_title(chart.title)
        ax.set_xlabel("round")
        ax.set_ylabel(chart.y_label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if chart.y_max is not None:
            ax.set_ylim(top=min(chart.y_max * 1.02, max(ax.get_ylim()[1], 0)))
        if chart.y_min is not None:
            ax.set_ylim(bottom=chart.y_min)
        ax.grid(True, color="#e6e6e6")
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="small",
            ncols=1 + len(chart.series) // 20,
        )
        path = out_dir / f"{chart.id}.png"
        fig.savefig(path)
        written.append(path)
    return written


# --- the command ------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """``alliance report RUN [--work-dir DIR] [--out DIR] [--no-png]``."""
    from pathlib import Path as _Path

    parser.add_argument(
        "run",
        nargs="?",
        metavar="RUN",
        help="the run's name in the store (a TrainingRun's status.storeRun); with --work-dir "
        "the default is the work dir's last run",
    )
    parser.add_argument(
        "--work-dir",
        type=_Path,
        help="an embedded alliance's work dir (default: the store from ALLIANCE_S3_*)",
    )
    parser.add_argument(
        "--out",
        type=_Path,
        help="where report.html and the PNGs go (default: WORK_DIR/reports/RUN with "
        "--work-dir, else ./report-RUN)",
    )
    parser.add_argument("--no-png", action="store_true", help="write report.html only")


def command(args) -> int:
    """Write OUT/report.html (and OUT/*.png) and print its path; errors in one line."""
    import contextlib
    import sys

    from alliance.s3server import S3Server, S3ServerError
    from alliance.store import Store, StoreConfig, StoreError

    try:
        with contextlib.ExitStack() as stack:
            if args.work_dir:
                work = args.work_dir.resolve()
                if not (work / "s3" / "credentials").exists():
                    raise ReportError(f"{work} is not an embedded alliance's work dir (no s3/)")
                run = args.run or _last_run(work)
                server = stack.enter_context(S3Server(work / "s3"))
                store = Store(server.config, retry_seconds=10)
                out = args.out or work / "reports" / run
            else:
                if not args.run:
                    raise ReportError("name the run: alliance report RUN")
                run = args.run
                store = Store(StoreConfig.from_env(), retry_seconds=30)
                out = args.out or Path(f"report-{run}")
            report = load(store, run)
        if not report.rounds:
            raise NoRounds(run, report.phase, report.message)
        out.mkdir(parents=True, exist_ok=True)
        page = out / "report.html"
        page.write_text(render_html(report), encoding="utf-8")
        warning = ""
        if not args.no_png:
            try:
                pngs = write_pngs(report, out)
            except ReportError as exc:
                warning = f"warning: no PNGs: {exc}"
            else:
                print(f"{len(pngs)} charts as PNG in {out}", file=sys.stderr)
    except (ReportError, StoreError, S3ServerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if warning:
        print(warning, file=sys.stderr)
    print(page)
    return 0


def _last_run(work: Path) -> str:
    last = work / "last-run"
    if not last.exists():
        raise ReportError(f"name the run: {work} has no last run (alliance report RUN)")
    return last.read_text().strip()
