"""The agent's contract: what the operator and the embedded runner build, the agent accepts.

The command lines go through the real ``alliance`` parser; the variable names are pinned, since
people who run an agent by hand set them too (docs/data-format.md, docs/operations.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from alliance import cli, contract, embedded

TRAIN_COMMAND = "python /app/train.py {model_in} {data_dir} {model_out} {metrics_out} {epochs}"
VALIDATE_COMMAND = "python /app/validate.py {model_in} {data_dir} {metrics_out}"


def parse(args: list[str]):
    return cli.build_parser().parse_args(args)


def test_the_variable_names_are_the_documented_ones():
    assert {name: value for name, value in vars(contract).items() if name.startswith("ENV_")} == {
        "ENV_S3_ENDPOINT": "ALLIANCE_S3_ENDPOINT",
        "ENV_S3_ACCESS_KEY": "ALLIANCE_S3_ACCESS_KEY",
        "ENV_S3_SECRET_KEY": "ALLIANCE_S3_SECRET_KEY",
        "ENV_BUCKET": "ALLIANCE_BUCKET",
        "ENV_S3_CA_FILE": "ALLIANCE_S3_CA_FILE",
        "ENV_CPU_THREADS": "ALLIANCE_CPU_THREADS",
        "ENV_CPU_LEASE": "ALLIANCE_CPU_LEASE",
        "ENV_CPU_LEASE_SLOTS": "ALLIANCE_CPU_LEASE_SLOTS",
        "ENV_CACHE_DIR": "ALLIANCE_CACHE_DIR",
        "ENV_DATA_SCHEMA": "ALLIANCE_DATA_SCHEMA",
        "ENV_METRICS_PORT": "ALLIANCE_METRICS_PORT",
    }


MEMBER_OPTIONS = {
    "defaults": {},
    "log-level": {"log_level": "info"},
    "validator": {"validator": True},
    "train-command": {"train_command": TRAIN_COMMAND},
    "validate-command": {"validate_command": VALIDATE_COMMAND},
    "everything": {
        "log_level": "debug",
        "validator": True,
        "train_command": TRAIN_COMMAND,
        "validate_command": VALIDATE_COMMAND,
    },
}


def test_the_notice_bucket_is_named_after_the_alliances_within_s3s_limit():
    assert contract.notice_bucket("alliance") == "alliance-notices"
    assert contract.notice_bucket("b" * 55) == "b" * 55 + "-notices"  # 63 characters
    assert contract.notice_bucket("b" * 56) is None  # members of such a bucket poll


@pytest.mark.parametrize("options", MEMBER_OPTIONS.values(), ids=MEMBER_OPTIONS)
def test_alliance_member_parses_what_member_args_builds(options):
    args = parse(contract.member_args("hospital-a", Path("/data"), **options))
    assert args.func is cli.cmd_member
    assert args.name == "hospital-a"
    assert args.data_dir == Path("/data")
    assert args.log_level == options.get("log_level")  # None: the command's default
    assert args.validator is options.get("validator", False)
    assert args.train_command == options.get("train_command")
    assert args.validate_command == options.get("validate_command")
    assert args.schema is None and args.metrics_port is None  # both travel in the environment


INIT_OPTIONS = {
    "defaults": {},
    "log-level": {"log_level": "info"},
    "keras-object": {"log_level": "info", "keras_object": "uploads/my-model.keras"},
    "model-file": {"model_file": Path("/work/model.keras")},
    "schema": {"model_file": Path("/work/model.keras"), "schema_file": Path("/work/s.yaml")},
}


@pytest.mark.parametrize("seed", [0, 4294967295])
@pytest.mark.parametrize("options", INIT_OPTIONS.values(), ids=INIT_OPTIONS)
def test_alliance_init_parses_what_init_args_builds(options, seed):
    args = parse(contract.init_args(seed, **options))
    assert args.func is cli.cmd_init
    assert args.seed == seed
    assert args.log_level == options.get("log_level")  # None: the command's default
    assert args.keras_object == options.get("keras_object")
    assert args.model == options.get("model_file")
    assert args.schema == options.get("schema_file")


def test_init_args_refuses_two_models_as_the_parser_would():
    with pytest.raises(ValueError, match="not both"):
        contract.init_args(0, keras_object="uploads/m.keras", model_file="m.keras")
    with pytest.raises(SystemExit):
        parse(["init", "--keras-object", "uploads/m.keras", "--model", "m.keras"])


def test_the_embedded_runner_starts_the_agent_and_init_with_the_contracts_arguments(
    tmp_path, monkeypatch
):
    started = []
    monkeypatch.setattr(embedded.subprocess, "Popen", lambda argv, **_: started.append(argv))
    embedded.start_member("member-1", tmp_path / "m1", {}, tmp_path / "m1.log", TRAIN_COMMAND)
    embedded.init_in_subprocess({}, tmp_path / "init.log", tmp_path / "model.keras", 3)
    member, init = started
    python_m_alliance = [sys.executable, "-m", "alliance"]
    assert member == python_m_alliance + contract.member_args(
        "member-1", tmp_path / "m1", log_level="info", train_command=TRAIN_COMMAND
    )
    assert init == python_m_alliance + contract.init_args(3, model_file=tmp_path / "model.keras")
    agent = parse(member[3:])
    assert (agent.name, agent.data_dir, agent.train_command) == (
        "member-1",
        tmp_path / "m1",
        TRAIN_COMMAND,
    )
    assert parse(init[3:]).model == tmp_path / "model.keras"
