"""A TrainingRun's engine spec: the run's own fields, else its Alliance's runDefaults."""

from __future__ import annotations

from alliance.engine import RunSpec, SpecError

#: The TrainingRun spec fields that are the engine's RunSpec (the rest are the operator's).
RUN_FIELDS = tuple(RunSpec().to_dict())


def effective_spec(spec: dict, run_defaults: dict | None) -> dict:
    """The run's own fields, else the Alliance's runDefaults; the engine fills the rest.

    The default aggregatorParams belong to the default aggregator: a run that picks another
    aggregator does not inherit them.
    """
    merged = {k: v for k, v in (run_defaults or {}).items() if k in RUN_FIELDS}
    own = {k: v for k, v in spec.items() if k in RUN_FIELDS and v is not None}
    if own.get("aggregator", merged.get("aggregator")) != merged.get("aggregator"):
        merged.pop("aggregatorParams", None)
    merged.update(own)
    return merged


def requested_spec(spec: dict, alliance: dict) -> RunSpec:
    """The RunSpec the TrainingRun ``spec`` asks for under ``alliance``. A SpecError names
    the field and, when the bad value is a default, the Alliance it came from."""
    defaults = alliance["spec"].get("runDefaults") or {}
    try:
        return RunSpec.from_dict(effective_spec(spec, defaults))
    except SpecError as exc:
        if exc.field not in spec and exc.field in defaults:
            exc.args = (f'{exc} (from Alliance "{alliance["metadata"]["name"]}" spec.runDefaults)',)
        raise
