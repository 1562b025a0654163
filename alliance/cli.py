"""The ``alliance`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml

from alliance import __version__, contract, cpulease

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = PROJECT_ROOT / "examples" / "mnist-sample"

EPILOG_RUN = """\
examples:
  alliance demo                                   3 members x 3 rounds on the shipped sample
  alliance demo --data-dir DIR                    the same on DIR/train.csv(.gz), DIR/test.csv(.gz)
  alliance run --members 5 --rounds 10 --split dirichlet --alpha 0.3 --aggregator fedadam
  alliance run --run nightly --resume             continue a stopped run

Everything lives under --work-dir: the S3 server's data and generated credentials (s3/), the
members' data (members/), their logs (logs/) and the parse cache (cache/). Ctrl-C stops every
process; running again with the same --run resumes at the round it stopped in.
"""

EPILOG_MEMBER = """\
The store and the member's own keys come from a join bundle (--join bundle.yaml: the file the
alliance's admin hands over, from the Secret <member>-store, key bundle.yaml), or from the
environment (no defaults for credentials):
  ALLIANCE_S3_ENDPOINT    http://host:port or https://host
  ALLIANCE_S3_ACCESS_KEY  ALLIANCE_S3_SECRET_KEY  ALLIANCE_BUCKET
  ALLIANCE_S3_CA_FILE     a PEM CA that verifies the store's https certificate (optional)
Optional: ALLIANCE_CPU_THREADS (default: the cgroup CPU limit, else every core),
ALLIANCE_CACHE_DIR (where parsed data is cached), ALLIANCE_METRICS_PORT (as --metrics-port),
ALLIANCE_CPU_LEASE (a directory shared by the members of one machine: they then take turns
computing, ALLIANCE_CPU_LEASE_SLOTS at a time, default 1; see docs/operations.md).

Metrics (with --metrics-port): alliance_member_tasks_total{kind,outcome},
alliance_member_task_seconds{kind} and alliance_member_samples_per_second, each labelled
with member=NAME, at http://0.0.0.0:PORT/metrics. A port already in use logs a warning and the
agent works on without metrics.

The data directory holds train.csv and, for validation, test.csv (either may be gzipped); see
docs/data-format.md. With --train-command the member's own program trains instead of the
built-in Keras code; see docs/member-commands.md for the contract.
"""


EPILOG_IDENTITIES = """\
create and remove talk to MinIO's admin API (MinIO, or the embedded runner's JuiceFS gateway)
with the store's admin keys:
  ALLIANCE_S3_ENDPOINT  ALLIANCE_S3_ACCESS_KEY  ALLIANCE_S3_SECRET_KEY  ALLIANCE_BUCKET
  ALLIANCE_S3_CA_FILE (optional: the CA of an https store)

  alliance identities create hospital-a hospital-b --out bundles/ --alliance mnist
  alliance identities policy hospital-a --bucket alliance > policy.json
  alliance identities remove hospital-b

On Kubernetes the operator does this for every Member (docs/operations.md, section 6).
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, (args.log_level or "warning").upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from alliance.data.errors import DataError
    from alliance.engine import SpecError
    from alliance.s3server import S3ServerError
    from alliance.store import StoreError
    from alliance.trainers import TaskError

    expected = (DataError, SpecError, StoreError, S3ServerError, TaskError, ValueError, OSError)
    try:
        return args.func(args)
    except expected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alliance",
        description="Federated learning: members train one model together without sharing "
        "data. Run a whole alliance on this machine (demo, run), or one part of "
        "it (member, coordinate, init) against an S3 store.",
    )
    parser.add_argument("--version", action="version", version=f"alliance {__version__}")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: warning (for `member`: info from the agent itself)",
    )
    sub = parser.add_subparsers(metavar="COMMAND")
    # --log-level is accepted after the command too (`alliance member --log-level info`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"]
    )

    def add(*args, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(*args, parents=[common], **kwargs)

    for name, helptext in (
        ("demo", "a real federated MNIST training on the shipped sample"),
        ("run", "a federated training on this machine, from your CSV data"),
    ):
        p = add(
            name,
            help=helptext,
            description=helptext + ".",
            epilog=EPILOG_RUN,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _run_arguments(p)
        if name == "demo":
            # Two local epochs: on the 10,000-row sample, 3 rounds then reach ~98%.
            p.set_defaults(epochs=2)
        p.set_defaults(func=cmd_run)

    p = add(
        "member",
        help="the member agent: train and validate when asked",
        description="Run a member agent: validate the local data, then train "
        "and validate the alliance's model when a run asks.",
        epilog=EPILOG_MEMBER,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--join",
        type=Path,
        metavar="BUNDLE",
        help="a join bundle (YAML): the member's name, the store and its own keys; "
        "replaces --name and the ALLIANCE_S3_* variables",
    )
    p.add_argument("--name", help="the member's name, unique in the alliance (or --join)")
    p.add_argument(
        "--data-dir",
        required=True,
        type=Path,
        help="directory with train.csv and test.csv (optionally .gz)",
    )
    p.add_argument(
        "--schema",
        type=Path,
        help="data schema YAML (default: ALLIANCE_DATA_SCHEMA, else the one the alliance was "
        "initialised with, else mnist-in-csv)",
    )
    p.add_argument(
        "--validator",
        action="store_true",
        help="only score each round's model on DIR/test.csv (a global test set); never train",
    )
    p.add_argument("--train-command", help="your own train command template")
    p.add_argument("--validate-command", help="your own validate command template")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port (default: ALLIANCE_METRICS_PORT, else off)",
    )
    p.set_defaults(func=cmd_member)

    p = add(
        "coordinate",
        help="drive one run's rounds against an S3 store",
        description="Coordinate a run: publish tasks, aggregate, validate, "
        "until the last round. Status is kept in the store, so a "
        "restarted coordinator resumes at the same round.",
        epilog="The store comes from ALLIANCE_S3_* and ALLIANCE_BUCKET, as for `alliance member`.",
    )
    p.add_argument("--run", required=True, help="the run's name")
    p.add_argument("--spec", type=Path, help="run spec YAML (see examples/run.yaml)")
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=60.0,
        help="seconds without a heartbeat after which a member counts as lost "
        "and drops out of its round (default 60)",
    )
    p.add_argument(
        "--members",
        metavar="NAMES",
        help="the alliance's members, comma-separated (e.g. hospital-a,hospital-b): anyone "
        "else's heartbeat and results are ignored. Default: every member with a heartbeat",
    )
    p.set_defaults(func=cmd_coordinate)

    p = add(
        "init",
        help="initialise an alliance: bucket, model, seed weights",
        description="Create the bucket and write the model definition and the "
        "seed weights, once (an initialised alliance is left as is).",
        epilog="The store is given by the environment, as for `alliance member`: "
        "ALLIANCE_S3_ENDPOINT, ALLIANCE_S3_ACCESS_KEY, ALLIANCE_S3_SECRET_KEY, ALLIANCE_BUCKET "
        "(and ALLIANCE_S3_CA_FILE for an https store with a CA of its own); `alliance store` "
        "starts one and prints them.",
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument(
        "--model", type=Path, help="a local .keras model file (default: the built-in CNN)"
    )
    model.add_argument(
        "--keras-object",
        metavar="KEY",
        help="the key of a .keras model file already uploaded to the alliance's bucket",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the initial weights")
    p.add_argument(
        "--schema",
        type=Path,
        help="the members' data schema YAML (default: mnist-in-csv): the model must fit it, "
        "and it is recorded for the members and predict",
    )
    p.set_defaults(func=cmd_init)

    p = add(
        "store",
        help="run the built-in S3 server alone, for member, coordinate and init by hand",
        description="Start the built-in S3 server (the JuiceFS gateway the embedded runner "
        "uses) on loopback, with its data and generated keys in DIR, and print the "
        "ALLIANCE_S3_* lines to export in the shells that run `alliance init`, `member` and "
        "`coordinate`. Runs until Ctrl-C; started again on the same DIR, it keeps its keys "
        "and objects.",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=Path("alliance-store"),
        help="where the objects and keys live (default ./alliance-store)",
    )
    p.add_argument("--port", type=int, default=9000, help="loopback port (default 9000)")
    p.add_argument("--bucket", default="alliance", help="the bucket to create (default alliance)")
    p.set_defaults(func=cmd_store)

    p = add(
        "identities",
        help="members' own store keys: create, rotate, remove; the policy; join bundles",
        description="Give each member its own store identity: an S3 user whose policy lets "
        "it read the models, tasks and run specs and write only its own objects.",
        epilog=EPILOG_IDENTITIES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(metavar="ACTION", required=True)
    q = actions.add_parser(
        "create",
        help="create (or rotate) members' users; write a join bundle for each",
        description="Create each member's user and policy with the admin keys in ALLIANCE_S3_* "
        "(run again: a new key, the old one stops working at once), and write "
        "OUT/<member>.bundle.yaml (mode 0600) for `alliance member --join`.",
    )
    q.add_argument("members", nargs="+", metavar="MEMBER")
    q.add_argument("--out", type=Path, required=True, help="where the bundles go")
    q.add_argument("--alliance", help="the alliance's name in the bundles (default: the bucket)")
    q.add_argument(
        "--endpoint",
        help="the store's URL as the members reach it (default: ALLIANCE_S3_ENDPOINT)",
    )
    q.set_defaults(func=cmd_identities_create)
    q = actions.add_parser(
        "remove",
        help="delete members' users and policies",
        description="Delete each member's user and policy (done when already gone).",
    )
    q.add_argument("members", nargs="+", metavar="MEMBER")
    q.set_defaults(func=cmd_identities_remove)
    q = actions.add_parser(
        "policy",
        help="print a member's IAM policy (JSON), for a store without MinIO's admin API",
        description="Print the IAM policy of MEMBER's user in BUCKET, to create the user by "
        "hand on an S3 service without MinIO's admin API. Needs no store.",
    )
    q.add_argument("member", metavar="MEMBER")
    q.add_argument("--bucket", required=True)
    q.set_defaults(func=cmd_identities_policy)
    q = actions.add_parser(
        "bundle",
        help="print a join bundle from a member's keys in ALLIANCE_S3_*",
        description="Print MEMBER's join bundle, made from the member's own keys in the "
        "environment (ALLIANCE_S3_*, ALLIANCE_BUCKET, ALLIANCE_S3_CA_FILE): for keys made "
        "by hand.",
    )
    q.add_argument("member", metavar="MEMBER")
    q.add_argument("--alliance", help="the alliance's name in the bundle (default: the bucket)")
    q.set_defaults(func=cmd_identities_bundle)

    p = add(
        "check-data",
        help="validate a member's data directory",
        description="Validate DIR/train.csv and DIR/test.csv as a member agent "
        "would; print a summary, or the exact error (file, line, "
        "column, rule) and exit 1.",
    )
    p.add_argument("data_dir", type=Path, metavar="DIR")
    p.add_argument("--schema", type=Path, help="data schema YAML (default: mnist-in-csv)")
    p.set_defaults(func=cmd_check_data)

    p = add(
        "split",
        help="split a CSV dataset into member directories",
        description="Split TRAIN (and TEST) into OUT/member-1..N, IID or "
        "non-IID (Dirichlet), reproducibly.",
    )
    p.add_argument("train", type=Path, help="the training CSV (plain or .gz)")
    p.add_argument("test", type=Path, nargs="?", help="the test CSV, split the same way (optional)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="writes OUT/member-1 .. member-N/train.csv (and test.csv)",
    )
    p.add_argument("--schema", type=Path, help="data schema YAML (default: mnist-in-csv)")
    _split_arguments(p)
    p.set_defaults(func=cmd_split)

    p = add(
        "predict",
        help="label a CSV with a stored model",
        description="Predict the label of every row of INPUT with a stored "
        "model; write OUTPUT with a prediction and a confidence "
        "column. When INPUT has labels, print the accuracy.",
    )
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument(
        "--work-dir",
        type=Path,
        help="an embedded alliance's work dir (default: the store from ALLIANCE_S3_*)",
    )
    p.add_argument("--run", help="use this run's final model")
    p.add_argument("--model", help="use this model id (sha256)")
    p.add_argument(
        "--schema",
        type=Path,
        help="data schema YAML (default: the one the alliance was initialised with)",
    )
    p.add_argument("--predict-command", help="your own predict command template")
    p.set_defaults(func=cmd_predict)

    from alliance import report

    p = add(
        "report",
        help="a run's report: one HTML page of charts and tables (and PNGs)",
        description="Write a run's report from the store: OUT/report.html, one self-contained "
        "page (summary; global accuracy and loss, each member's training and validation "
        "metrics, rejected, failed and dropped members, round times; a table of rounds), and "
        "the same charts as PNG (needs matplotlib: pip install 'alliance[report]').",
    )
    report.add_arguments(p)
    p.set_defaults(func=report.command)
    return parser


def _split_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--members", type=int, default=3, help="number of members (default 3)")
    p.add_argument(
        "--split",
        choices=["iid", "dirichlet"],
        default="iid",
        help="how rows are shared out (default iid)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet concentration; smaller is more skewed (default 0.5)",
    )
    p.add_argument("--seed", type=int, help="random seed (default 0)")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        help="dataset to split among members: DIR/train.csv(.gz) and "
        "DIR/test.csv(.gz) (default: the shipped MNIST sample, "
        "10,000 train and 2,000 test rows)",
    )
    _split_arguments(p)
    p.add_argument("--rounds", type=int, help="training rounds (default 3)")
    p.add_argument(
        "--epochs", type=int, help="local epochs per round (default: 1; the demo's is 2)"
    )
    p.add_argument("--batch-size", type=int, help="(default 32)")
    p.add_argument(
        "--aggregator",
        help="fedavg, fedavgm, fedadam, fedyogi, fedadagrad, median, trimmedmean",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an aggregator parameter, e.g. serverLearningRate=0.01 (repeatable)",
    )
    p.add_argument(
        "--members-per-round", type=int, help="members asked each round (default 0: all)"
    )
    p.add_argument(
        "--min-members",
        type=int,
        default=None,
        help="quorum of updates to aggregate (default: a majority)",
    )
    p.add_argument(
        "--round-deadline",
        type=float,
        help="seconds a round waits for stragglers (default 600)",
    )
    p.add_argument("--spec", type=Path, help="a run spec YAML; flags given override it")
    p.add_argument("--run", help="run name (default: a timestamp); an existing run resumes")
    p.add_argument("--resume", action="store_true", help="resume the last run in --work-dir")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("alliance-work"),
        help="where the store, member data and logs live (default ./alliance-work)",
    )
    p.add_argument(
        "--model",
        type=Path,
        help="a .keras model file that fits the schema (default: the built-in CNN, sized for "
        "the schema's images); see docs/member-commands.md, 'The model'",
    )
    p.add_argument(
        "--schema",
        type=Path,
        help="how the CSV files are laid out (default: mnist-in-csv; see examples/schema.yaml); "
        "recorded with the alliance, so the members and predict use it too",
    )
    p.add_argument(
        "--cpu-sharing",
        default="auto",
        metavar="MODE",
        help="how the member processes share this machine's cores: shared (all at once, "
        "cores ÷ members TensorFlow threads each), turns (one at a time with every core, "
        "through a local CPU lease), a number N (N at a time, cores ÷ N threads each), or "
        "auto (default: the measured best, see README 'Performance')",
    )


# --- commands ---------------------------------------------------------------------------


def _schema(path: Path | None, default: object = "mnist"):
    """--schema FILE, else ALLIANCE_DATA_SCHEMA (JSON; how the operator passes a Member's
    spec.dataSchema to its pod), else ``default``: the mnist-in-csv schema, or None (the
    alliance's, from alliance.json)."""
    from alliance.data.errors import DataError
    from alliance.data.schema import DataSchema

    if path:
        return DataSchema.load(path)
    inline = os.environ.get(contract.ENV_DATA_SCHEMA)
    if inline:
        try:
            return DataSchema.from_dict(json.loads(inline))
        except json.JSONDecodeError as exc:
            raise DataError("schema", f"{contract.ENV_DATA_SCHEMA} is not JSON: {exc}") from exc
    return DataSchema() if default == "mnist" else default


def _dataset_files(data_dir: Path) -> tuple[Path, Path | None]:
    from alliance.data.datadir import find_data_file
    from alliance.data.errors import DataError

    train = find_data_file(data_dir, "train")
    try:
        test = find_data_file(data_dir, "test")
    except DataError:  # no test split: the members will not validate
        test = None
    return train, test


def _load_spec(path: Path) -> dict:
    """A run spec YAML file; errors name the file, line and column."""
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a run spec is a mapping of fields, got {type(spec).__name__}")
    return spec


def _run_spec(args) -> dict:
    spec: dict = {}
    if args.spec:
        spec = _load_spec(args.spec)
    # Flags given on the command line override the spec file; the rest keep its values, or
    # the defaults of RunSpec.
    flags = {
        "rounds": args.rounds,
        "localEpochs": args.epochs,
        "batchSize": args.batch_size,
        "aggregator": args.aggregator,
        "membersPerRound": args.members_per_round,
        "roundDeadlineSeconds": args.round_deadline,
        "seed": args.seed,
    }
    spec.update({k: v for k, v in flags.items() if v is not None})
    if args.param:
        spec["aggregatorParams"] = {
            k: yaml.safe_load(v) for k, _, v in (p.partition("=") for p in args.param)
        }
    asked = spec.get("membersPerRound") or args.members
    spec["minMembers"] = args.min_members or spec.get("minMembers") or asked // 2 + 1
    return spec


def cmd_run(args) -> int:
    from alliance.data.split import split_dataset
    from alliance.driver import StoreSink, drive, sleeping
    from alliance.embedded import EmbeddedAlliance, init_in_subprocess
    from alliance.engine import RunSpec

    spec = RunSpec.from_dict(_run_spec(args))
    seed = spec.seed
    cpu = cpulease.plan(len(os.sched_getaffinity(0)), args.members, args.cpu_sharing)
    work = args.work_dir.resolve()
    data_dir = args.data_dir or SAMPLE_DIR
    run = _pick_run_name(work, args)
    progress = Progress(spec, run)
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, _interrupt)
    with EmbeddedAlliance(work) as alliance:
        # The members' data is split once per dataset and split settings; a resumed run
        # keeps the data it started with.
        split_key = f"{data_dir.resolve()} {args.members} {args.split} {args.alpha} {seed}"
        marker = work / "members" / ".split"
        member_dirs = sorted((work / "members").glob("member-*"))
        resuming = (args.resume or bool(args.run)) and len(member_dirs) == args.members
        if not resuming and (not marker.exists() or marker.read_text() != split_key):
            shutil.rmtree(work / "members", ignore_errors=True)
            train, test = _dataset_files(data_dir)
            progress.say(f"splitting {train.name} among {args.members} members ({args.split})")
            member_dirs = split_dataset(
                train,
                test,
                work / "members",
                args.members,
                args.split,
                args.alpha,
                seed,
                schema=_schema(args.schema),
            )
            marker.write_text(split_key)
        if (args.model or args.schema) and alliance.store.get_alliance() is not None:
            progress.say(
                f"note: the alliance in {work} was initialised before: its model and schema "
                "stay (--model and --schema apply to a new --work-dir)"
            )
        init = init_in_subprocess(
            alliance.env(cpu), work / "logs" / "init.log", args.model, seed, args.schema
        )
        alliance.start_members(member_dirs, cpu)
        progress.say(
            f"S3 store at {alliance.server.endpoint}; {args.members} members starting "
            f"({cpu.describe(args.members)}); logs in {work / 'logs'}"
        )
        (work / "last-run").write_text(run)
        progress.say("waiting for the members to check their data and load TensorFlow")
        problems = alliance.wait_until_ready(check=lambda: _init_failed(init))
        for name, problem in sorted(problems.items()):
            progress.say(f"{name}: {problem}")

        def lost() -> set[str]:
            gone = alliance.supervise() | _init_failed(init)
            for m in alliance.members:
                if m.name in gone and m.name not in problems:
                    problems[m.name] = f"crashed: {m.last_line()}"
                    progress.say(f"{m.name}: {problems[m.name]}")
            return gone

        status = drive(
            alliance.store,
            run,
            spec,
            StoreSink(alliance.store, run, on_change=progress.update),
            sleeping(),
            lost=lost,
            members=alliance.names,
        )
        init.wait()
        page = _report_page(alliance.store, run, work, status)
    progress.done(status, time.perf_counter() - started, work, page)
    return 0 if status.phase == "Completed" else 1


def _report_page(store, run: str, work: Path, status) -> Path | None:
    """The run's report as WORK/reports/RUN/report.html (None, with a warning, when it cannot
    be made: the run's outcome stands)."""
    from alliance import report
    from alliance.store import StoreError

    try:
        return report.write_html(store, run, work / "reports" / run, status.to_dict())
    except (report.ReportError, StoreError, OSError) as exc:
        logging.getLogger("alliance").warning("no report page: %s", exc)
        return None


def _interrupt(*_) -> None:
    """SIGTERM takes the same orderly path as Ctrl-C: every child process is stopped."""
    raise KeyboardInterrupt


def _init_failed(init) -> set[str]:
    if init.poll() not in (None, 0):
        why = init.last_line().removeprefix("error: ")
        raise ValueError(f"initialising the alliance failed: {why} (log: {init.log_path})")
    return set()


def _pick_run_name(work: Path, args) -> str:
    if args.run:
        return args.run
    last = work / "last-run"
    if args.resume:
        if not last.exists():
            raise ValueError(f"--resume: no earlier run in {work}")
        return last.read_text().strip()
    return time.strftime("run-%Y%m%d-%H%M%S")


class Progress:
    """Live progress on a terminal; one line per event otherwise (logs, CI)."""

    def __init__(self, spec, run: str, stream=sys.stdout):
        self.spec = spec
        self.run = run
        self.stream = stream
        self.tty = stream.isatty()
        self.reported: set[int] = set()
        self.last_message = ""
        self.last_stage: tuple = ()
        self.last_printed = 0.0
        self.quiet_seconds = 10.0

    def say(self, text: str) -> None:
        self._clear()
        print(text, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty and self.last_message:
            print("\r\033[K", end="", file=self.stream)

    def update(self, status) -> None:
        for record in status.history:
            if record.finished_at and record.round not in self.reported:
                self.reported.add(record.round)
                self.say(_round_line(record, self.spec.rounds))
        if status.message and status.message != self.last_message:
            if self.tty:
                print(f"\r\033[K  {status.message}", end="", file=self.stream, flush=True)
            elif (status.round, status.stage) != self.last_stage or (
                time.monotonic() - self.last_printed >= self.quiet_seconds
            ):
                # Without a terminal (logs, CI): a line when a stage starts, then at most one
                # every quiet_seconds while it lasts, not one per answer.
                print(f"  {status.message}", file=self.stream, flush=True)
                self.last_printed = time.monotonic()
            self.last_message = status.message
            self.last_stage = (status.round, status.stage)

    def done(self, status, seconds: float, work: Path | None, page: Path | None = None) -> None:
        """The run's end: its outcome, a table of rounds and, when it completed, where its
        final model is (``work``: the embedded runner's work dir; None: ALLIANCE_S3_*'s)."""
        self._clear()
        print(
            f"\nrun {self.run}: {status.phase} — {status.message} ({seconds:.0f} s)",
            file=self.stream,
        )
        print(
            f"\n{'round':>5} {'members':>8} {'dropped':>8} {'rejected':>9} {'seconds':>8} "
            f"{'train loss':>11} {'accuracy':>9}  model",
            file=self.stream,
        )
        for r in status.history:
            acc = f"{r.accuracy:.4f}" if r.accuracy is not None else "-"
            loss = f"{r.train_loss:.4f}" if r.train_loss is not None else "-"
            print(
                f"{r.round:>5} {len(r.members):>8} {len(r.dropped):>8} {len(r.rejected):>9} "
                f"{r.seconds:>8.1f} {loss:>11} {acc:>9}  {(r.model_id or '-')[:12]}",
                file=self.stream,
            )
        if status.model_id and status.phase == "Completed":
            where = f"the store under {work / 's3'}" if work else "the store"
            store_flag = f"--work-dir {work} " if work else ""
            print(
                f"\nfinal model: models/{status.model_id}.npz in {where}\nevery round's model, "
                f"update and metric: runs/{self.run}/ in the same store\nlabel a CSV with it: "
                f"alliance predict {store_flag}--run {self.run} --input X.csv --output labels.csv",
                file=self.stream,
            )
        final = status.history[-1].accuracy if status.history else None
        if final is not None:
            print(f"final test accuracy: {final:.4f}", file=self.stream)
        if page is not None:
            print(f"report (charts per round and member): {page}", file=self.stream)
        self.stream.flush()


def _round_line(record, rounds: int) -> str:
    acc = f"accuracy {record.accuracy:.4f}" if record.accuracy is not None else "accuracy -"
    extra = ""
    if record.dropped:
        extra += f", dropped {', '.join(record.dropped)}"
    if record.rejected:
        extra += f", rejected {', '.join(record.rejected)}"
    return (
        f"round {record.round}/{rounds}: {len(record.members)} members done, "
        f"{record.seconds:.1f} s, {acc}{extra}"
    )


def _store():
    from alliance.store import Store, StoreConfig

    return Store(StoreConfig.from_env())


def _joined(path: Path):
    """The member's name and store from a join bundle (alliance/contract.py)."""
    import yaml

    from alliance import identities
    from alliance.store import Store, StoreConfig

    try:
        bundle = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a YAML join bundle: {exc}") from None
    b = contract.read_join_bundle(bundle, str(path))
    identities.check_name(b["member"])  # the name its objects are stored under
    config = StoreConfig(b["endpoint"], b["access_key"], b["secret_key"], b["bucket"], b["ca_cert"])
    logging.getLogger("alliance").info(
        "joining alliance %s as %s through %s", b["alliance"], b["member"], b["endpoint"]
    )
    return b["member"], Store(config)


def cmd_member(args) -> int:
    from alliance.member import Agent, AgentConfig

    if args.join:
        if args.name:
            raise ValueError("--join names the member: give --name or --join, not both")
        name, store = _joined(args.join)
    elif args.name:
        name, store = args.name, _store()
    else:
        raise ValueError("the member's name: give --join BUNDLE (or --name NAME)")
    if args.log_level is None:
        # A member's operator sees its agent work: data checked, ready, one line per task.
        logging.getLogger("alliance.member").setLevel(logging.INFO)
    cache = os.environ.get(contract.ENV_CACHE_DIR)
    lease = os.environ.get(contract.ENV_CPU_LEASE)
    agent = Agent(
        store,
        AgentConfig(
            name=name,
            data_dir=args.data_dir,
            schema=_schema(args.schema, default=None),
            train_command=args.train_command,
            validate_command=args.validate_command,
            cache_dir=Path(cache) if cache else None,
            validator=args.validator,
            metrics_port=_metrics_port(args.metrics_port),
            cpu_lease=_cpu_lease(lease) if lease else None,
        ),
    )
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    agent.run()
    return 0


def _cpu_lease(directory: str) -> cpulease.CpuLease:
    try:
        return cpulease.CpuLease(Path(directory), _lease_slots())
    except OSError as exc:  # not creatable or not writable: say which setting is wrong
        raise ValueError(
            f"{contract.ENV_CPU_LEASE}={directory!r}: not a usable directory "
            f"({exc.strerror or exc})"
        ) from exc


def _lease_slots() -> int:
    text = os.environ.get(contract.ENV_CPU_LEASE_SLOTS, "1")
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{contract.ENV_CPU_LEASE_SLOTS}={text!r}: give a whole number ≥ 1")
    return int(text)


def cmd_store(args) -> int:
    from alliance.s3server import S3Server
    from alliance.store import Store

    server = S3Server(args.dir.resolve(), bucket=args.bucket, port=args.port)
    signal.signal(signal.SIGTERM, _interrupt)
    with server:
        Store(server.config).ensure_bucket()
        print(f"# the S3 store serves {args.dir.resolve()} at {server.endpoint}; in each shell:")
        for name, value in server.config.to_env().items():
            print(f"export {name}={shlex.quote(value)}")
        print("# Ctrl-C stops it", flush=True)
        try:
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            return 0
    raise ValueError(f"the S3 server exited; see {args.dir.resolve() / 'gateway.log'}")


def cmd_identities_create(args) -> int:
    from alliance import identities
    from alliance.store import StoreConfig

    admin = StoreConfig.from_env()
    made = identities.provision(admin, args.members)
    args.out.mkdir(parents=True, exist_ok=True)
    for member, keys in made.items():
        path = args.out / f"{member}.bundle.yaml"
        text = identities.bundle_yaml(
            args.alliance or admin.bucket, member, keys, args.endpoint or admin.endpoint
        )
        path.touch(mode=0o600)
        path.chmod(0o600)  # it holds the member's secret key
        path.write_text(text)
        print(f"{member}: user {keys.access_key}, bundle {path}")
    return 0


def cmd_identities_remove(args) -> int:
    from alliance import identities
    from alliance.store import StoreConfig

    admin = StoreConfig.from_env()
    for member in args.members:
        identities.remove(admin, member)
        print(f"{member}: removed")
    return 0


def cmd_identities_policy(args) -> int:
    from alliance import identities

    identities.check_name(args.member)
    print(json.dumps(identities.member_policy(args.bucket, args.member), indent=2))
    return 0


def cmd_identities_bundle(args) -> int:
    from alliance import identities
    from alliance.store import StoreConfig

    identities.check_name(args.member)
    keys = StoreConfig.from_env()
    print(identities.bundle_yaml(args.alliance or keys.bucket, args.member, keys, keys.endpoint))
    return 0


def _metrics_port(flag: int | None) -> int:
    """--metrics-port, else ALLIANCE_METRICS_PORT, else 0 (no metrics)."""
    raw = os.environ.get(contract.ENV_METRICS_PORT, "") if flag is None else str(flag)
    try:
        port = int(raw or 0)
    except ValueError:
        raise ValueError(f"{contract.ENV_METRICS_PORT}: not a port number: {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics port {port}: must be 0 (off) or 1-65535")
    return port


def cmd_coordinate(args) -> int:
    from alliance.driver import StoreSink, drive, sleeping
    from alliance.engine import RunSpec

    spec = RunSpec.from_dict(_load_spec(args.spec) if args.spec else {})
    store = _store()
    progress = Progress(spec, args.run)
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, _interrupt)
    sink = StoreSink(store, args.run, on_change=progress.update)
    named = {m.strip() for m in (args.members or "").split(",") if m.strip()}
    members = (lambda: named) if named else None
    if not named:
        progress.say("every member with a heartbeat counts (--members names the alliance's)")
    status = drive(
        store,
        args.run,
        spec,
        sink,
        sleeping(),
        heartbeat_timeout=args.heartbeat_timeout,
        members=members,
    )
    progress.done(status, time.perf_counter() - started, None)
    return 0 if status.phase == "Completed" else 1


def cmd_init(args) -> int:
    from alliance.member import cpu_threads
    from alliance.model import configure_threads, init_alliance

    configure_threads(cpu_threads())
    manifest = init_alliance(
        _store(), args.model, args.seed, keras_object=args.keras_object, schema=_schema(args.schema)
    )
    print(f"alliance initialised: seed model {manifest['seedModelId']}")
    return 0


def cmd_check_data(args) -> int:
    from alliance.data.datadir import validate_data_dir

    summary = validate_data_dir(args.data_dir, _schema(args.schema))
    print(f"{args.data_dir}: OK")
    for split, path in summary.files.items():
        rows = summary.train_rows if split == "train" else summary.test_rows
        print(f"  {split}: {path}: {rows} rows")
    if not summary.test_rows:
        print("  test: none (this member will not validate models)")
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(summary.label_counts.items()))
    print(f"  train labels: {counts}")
    for warning in summary.warnings:  # valid data, likely not what was meant: still exit 0
        print(f"  warning: {warning}")
    return 0


def cmd_split(args) -> int:
    from alliance.data.split import split_dataset

    dirs = split_dataset(
        args.train,
        args.test,
        args.out,
        args.members,
        args.split,
        args.alpha,
        args.seed or 0,
        schema=_schema(args.schema),
    )
    for d in dirs:
        print(d)
    return 0


def cmd_predict(args) -> int:
    import contextlib

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up lines: noise here
    import numpy as np

    from alliance.data.parse import read_features_csv
    from alliance.engine import RunStatus
    from alliance.s3server import S3Server
    from alliance.store import Store

    with contextlib.ExitStack() as stack:
        if args.work_dir:
            server = stack.enter_context(S3Server(args.work_dir.resolve() / "s3"))
            store = Store(server.config)
        else:
            store = _store()
        model_id = args.model
        if model_id is None:
            if not args.run:
                raise ValueError("give --model ID or --run NAME")
            saved = store.get_run_status(args.run)
            status = saved and RunStatus.from_dict(saved)
            if not status or not status.model_id:
                raise ValueError(f"run {args.run!r} has no model in this store")
            model_id = status.model_id
        arrays = store.get_model(model_id)
        if args.predict_command:
            from alliance.trainers import CommandTrainer

            CommandTrainer(args.input.parent, predict_command=args.predict_command).predict_file(
                arrays, args.input, args.output
            )
            print(f"wrote {args.output}")
            return 0
        from alliance import model as model_mod
        from alliance.data.schema import DataSchema
        from alliance.trainers import KerasTrainer

        manifest = store.get_alliance() or {}
        if not manifest:
            raise ValueError("this store holds no alliance (alliance.json): nothing to predict")
        # The schema the alliance was made with, unless --schema (or the variable) says else.
        recorded = manifest.get("dataSchema")
        schema = _schema(args.schema, default=None) or DataSchema.from_dict(recorded or {})
        x, truth = read_features_csv(args.input, schema)  # truth: the file's labels, if any
        keras_model = model_mod.build(manifest["model"], store)
        model_mod.check_fits(keras_model, schema)
        probs = KerasTrainer(keras_model, args.input.parent, schema).predict(arrays, x)
    labels = probs.argmax(axis=1)
    import pandas as pd

    pd.DataFrame({"prediction": labels, "confidence": probs.max(axis=1).round(6)}).to_csv(
        args.output, index=False
    )
    print(f"wrote {len(labels)} predictions to {args.output} (model {model_id[:12]})")
    if truth is not None:
        print(f"accuracy against the file's labels: {float(np.mean(truth == labels)):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
