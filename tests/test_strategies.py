"""Aggregation strategies against hand-computed values (the arithmetic is in the comments)."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

from alliance.strategies import (
    STRATEGIES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    Median,
    Strategy,
    StrategyError,
    TrimmedMean,
    Update,
    create,
)


def f32(*values):
    return np.array(values, dtype=np.float32)


def up(member: str, n: int, *arrays) -> Update:
    """An update whose load returns fresh float32 copies and fails if called twice."""
    calls = []

    def load():
        assert not calls, f"load() of {member} called twice"
        calls.append(1)
        return [np.array(a, dtype=np.float32) for a in arrays]

    return Update(member, n, load)


def values(arrays):
    return [a.tolist() for a in arrays]


# --- FedAvg -------------------------------------------------------------------------------


def test_fedavg_weights_by_num_examples():
    # array 0: ([1, 2]*1 + [3, 4]*3) / 4 = [10, 14] / 4 = [2.5, 3.5]
    # array 1: ([[10]]*1 + [[30]]*3) / 4 = [[100]] / 4 = [[25]]
    new, state = FedAvg().aggregate(
        [f32(0, 0), np.zeros((1, 1), np.float32)],
        [up("a", 1, [1, 2], [[10]]), up("b", 3, [3, 4], [[30]])],
        None,
    )
    assert values(new) == [[2.5, 3.5], [[25.0]]]
    assert state is None


def test_fedavg_ignores_and_does_not_load_zero_example_updates():
    def never():
        raise AssertionError("an update with 0 examples was loaded")

    # only b counts: [6, -4]*2 / 2 = [6, -4]
    new, _ = FedAvg().aggregate([f32(0, 0)], [Update("a", 0, never), up("b", 2, [6, -4])], None)
    assert values(new) == [[6.0, -4.0]]


def test_fedavg_streams_one_update_at_a_time():
    """When an update is loaded, no array of an earlier update may still be alive."""
    live = 0  # loaded arrays not yet garbage-collected
    live_at_load = []

    def released():
        nonlocal live
        live -= 1

    def make_load(i):
        def load():
            nonlocal live
            live_at_load.append(live)
            arrays = [np.full(64, i, np.float32), np.full((3, 3), i, np.float32)]
            for a in arrays:
                weakref.finalize(a, released)
            live += len(arrays)
            return arrays

        return load

    # update i holds the value i and has i + 1 examples, i = 0..49:
    # sum i*(i+1) = sum i² + sum i = 49*50*99/6 + 49*50/2 = 40425 + 1225 = 41650
    # sum (i+1) = 50*51/2 = 1275;  41650 / 1275 = 32 + 850/1275 = 32 + 2/3 = 98/3
    updates = (Update(f"m{i}", i + 1, make_load(i)) for i in range(50))
    new, _ = FedAvg().aggregate(
        [np.zeros(64, np.float32), np.zeros((3, 3), np.float32)], updates, None
    )

    assert len(live_at_load) == 50
    assert max(live_at_load) == 0, f"arrays of earlier updates alive at load: {live_at_load}"
    assert live == 0
    assert new[0] == pytest.approx(np.full(64, 98 / 3), rel=1e-6)
    assert new[1] == pytest.approx(np.full((3, 3), 98 / 3), rel=1e-6)


def test_fedavg_errors():
    with pytest.raises(StrategyError, match="no updates"):
        FedAvg().aggregate([f32(0)], [], None)
    with pytest.raises(StrategyError, match="0 examples"):
        FedAvg().aggregate([f32(0)], [up("a", 0, [1]), up("b", 0, [2])], None)
    with pytest.raises(StrategyError, match=r"'b'.*shape"):
        FedAvg().aggregate([f32(0)], [up("a", 1, [1]), up("b", 1, [1, 2])], None)
    with pytest.raises(StrategyError, match=r"'a'.*num_examples"):
        FedAvg().aggregate([f32(0)], [up("a", -1, [1])], None)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_dtype_is_preserved(name):
    ups = [up("a", 1, [1, 2]), up("b", 1, [3, 4]), up("c", 1, [5, 6])]
    new, state = create(name).aggregate([f32(0, 0)], ups, None)
    assert [a.dtype for a in new] == [np.float32]
    assert state is None or all(a.dtype == np.float32 for a in state)


def test_fedavg_float64_stays_float64():
    new, _ = FedAvg().aggregate([np.zeros(1, np.float64)], [up("a", 1, [1.0])], None)
    assert new[0].dtype == np.float64


# --- FedAvgM -------------------------------------------------------------------------------


def test_fedavgm_two_rounds():
    s = FedAvgM()  # serverLearningRate 1.0, serverMomentum 0.9
    # Round 1: x = [1, 2]; mean of [2, 4] and [4, 4] (1 example each) = [3, 4];
    # delta = [2, 2]; v = 0.9*0 + [2, 2] = [2, 2]; x = [1, 2] + 1.0*[2, 2] = [3, 4].
    x, state = s.aggregate([f32(1, 2)], [up("a", 1, [2, 4]), up("b", 1, [4, 4])], None)
    assert values(x) == [[3.0, 4.0]] and values(state) == [[2.0, 2.0]]
    # Round 2: mean [6, 6]; delta = [3, 2]; v = 0.9*[2, 2] + [3, 2] = [4.8, 3.8];
    # x = [3, 4] + [4.8, 3.8] = [7.8, 7.8].
    x, state = s.aggregate(x, [up("a", 1, [6, 6])], state)
    np.testing.assert_allclose(x[0], [7.8, 7.8], rtol=1e-6)
    np.testing.assert_allclose(state[0], [4.8, 3.8], rtol=1e-6)


def test_fedavgm_without_momentum_is_fedavg():
    ups = lambda: [up("a", 1, [2, 4]), up("b", 3, [6, 8])]  # noqa: E731
    # FedAvg: (2*1 + 6*3)/4 = 5, (4*1 + 8*3)/4 = 7
    x, _ = FedAvgM(serverMomentum=0.0).aggregate([f32(1, 2)], ups(), None)
    assert values(x) == values(FedAvg().aggregate([f32(1, 2)], ups(), None)[0]) == [[5.0, 7.0]]
    with pytest.raises(StrategyError, match="serverMomentum"):
        FedAvgM(serverMomentum=1.0)
    with pytest.raises(StrategyError, match="state does not fit"):
        FedAvgM().aggregate([f32(1, 2)], ups(), [f32(0)])


# --- FedOpt: FedAdam, FedYogi, FedAdagrad -------------------------------------------------


def test_fedadam_two_rounds():
    # η=1, β1=0.5, β2=0.5, τ=1; m0 = 0, v0 = τ² = 1. Two arrays of one value each.
    # Round 1, x0 = [0], [10]; updates [-2],[9] (1 example) and [2],[9] (3 examples):
    #   mean = [(-2 + 6)/4], [(9 + 27)/4] = [1], [9]  ->  Δ = [1], [-1]
    #   m1 = 0.5*0 + 0.5*Δ = [0.5], [-0.5]
    #   v1 = 0.5*1 + 0.5*Δ² = [1], [1]
    #   x1 = x0 + m1/(√v1 + 1) = [0 + 0.5/2], [10 - 0.5/2] = [0.25], [9.75]
    adam = FedAdam(serverLearningRate=1, beta1=0.5, beta2=0.5, tau=1)
    x1, s1 = adam.aggregate([f32(0), f32(10)], [up("a", 1, [-2], [9]), up("b", 3, [2], [9])], None)
    assert values(x1) == [[0.25], [9.75]]
    assert values(s1) == [[0.5], [-0.5], [1.0], [1.0]]  # m arrays, then v arrays

    # Round 2, one update [7.25],[8.75] -> Δ = [7], [-1]
    #   m2 = [0.5*0.5 + 0.5*7], [0.5*(-0.5) + 0.5*(-1)] = [3.75], [-0.75]
    #   v2 = [0.5*1 + 0.5*49], [0.5*1 + 0.5*1] = [25], [1]
    #   x2 = [0.25 + 3.75/(5 + 1)], [9.75 - 0.75/(1 + 1)] = [0.875], [9.375]
    x2, s2 = adam.aggregate(x1, [up("c", 5, [7.25], [8.75])], s1)
    assert values(x2) == [[0.875], [9.375]]
    assert values(s2) == [[3.75], [-0.75], [25.0], [1.0]]


def test_fedyogi_two_rounds():
    # η=1, β1=0.5, β2=0.75, τ=1; m0 = 0, v0 = 1.
    # Round 1, x0 = [0, 0]; one update [1.5, 0.56] -> Δ = [1.5, 0.56], Δ² = [2.25, 0.3136]
    #   m1 = 0.5*Δ = [0.75, 0.28]
    #   v1[0]: v0 - Δ² = 1 - 2.25 < 0, sign -1: v = 1 + 0.25*2.25   = 1.5625 (√ = 1.25)
    #   v1[1]: v0 - Δ² = 1 - 0.3136 > 0, sign +1: v = 1 - 0.25*0.3136 = 0.9216 (√ = 0.96)
    #   x1 = [0.75/(1.25 + 1), 0.28/(0.96 + 1)] = [0.75/2.25, 0.28/1.96] = [1/3, 1/7]
    yogi = FedYogi(serverLearningRate=1, beta1=0.5, beta2=0.75, tau=1)
    x1, s1 = yogi.aggregate([f32(0, 0)], [up("a", 2, [1.5, 0.56])], None)
    assert x1[0] == pytest.approx([1 / 3, 1 / 7], rel=1e-6)
    assert s1[0] == pytest.approx([0.75, 0.28], rel=1e-6)
    assert s1[1] == pytest.approx([1.5625, 0.9216], rel=1e-6)

    # Round 2, the update equals x1 -> Δ = 0: momentum alone moves the model.
    #   m2 = 0.5*m1 = [0.375, 0.14];  v2 = v1 - 0.25*0*sign(...) = v1
    #   x2 = x1 + [0.375/2.25, 0.14/1.96] = [1/3 + 1/6, 1/7 + 1/14] = [0.5, 3/14]
    x2, s2 = yogi.aggregate(x1, [up("a", 2, x1[0])], s1)
    assert x2[0] == pytest.approx([0.5, 3 / 14], rel=1e-6)
    assert s2[0] == pytest.approx([0.375, 0.14], rel=1e-6)
    assert s2[1] == pytest.approx([1.5625, 0.9216], rel=1e-6)


def test_fedadagrad_two_rounds():
    # η=2, β1=0 (default), τ=3; m0 = 0, v0 = 9.
    # Round 1, x0 = [10, 10]; updates [12, 10] and [16, 10], 1 example each:
    #   mean = [14, 10] -> Δ = [4, 0];  m1 = Δ = [4, 0];  v1 = 9 + Δ² = [25, 9]
    #   x1 = [10 + 2*4/(5 + 3), 10 + 0] = [11, 10]
    adagrad = FedAdagrad(serverLearningRate=2, tau=3)
    x1, s1 = adagrad.aggregate([f32(10, 10)], [up("a", 1, [12, 10]), up("b", 1, [16, 10])], None)
    assert values(x1) == [[11.0, 10.0]]
    assert values(s1) == [[4.0, 0.0], [25.0, 9.0]]

    # Round 2, one update [23, 6] -> Δ = [12, -4];  m2 = [12, -4]
    #   v2 = [25 + 144, 9 + 16] = [169, 25]  (Adagrad only accumulates)
    #   x2 = [11 + 2*12/(13 + 3), 10 + 2*(-4)/(5 + 3)] = [12.5, 9]
    x2, s2 = adagrad.aggregate(x1, [up("c", 1, [23, 6])], s1)
    assert values(x2) == [[12.5, 9.0]]
    assert values(s2) == [[12.0, -4.0], [169.0, 25.0]]


def test_fedopt_defaults():
    assert FedAdam().values == {
        "serverLearningRate": 0.01,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
    }
    assert FedYogi().values == FedAdam().values
    assert FedAdagrad().values == {"serverLearningRate": 0.01, "beta1": 0.0, "tau": 1e-3}
    assert all(cls.stateful for cls in (FedAdam, FedYogi, FedAdagrad))
    assert not any(cls.stateful for cls in (FedAvg, Median, TrimmedMean))


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_fedopt_rejects_state_that_does_not_fit(cls):
    model = [f32(0, 0), f32(0)]
    ups = [up("a", 1, [1, 1], [1])]
    with pytest.raises(StrategyError, match="state has 3 arrays, expected 4"):
        cls().aggregate(model, ups, [f32(0, 0), f32(0), f32(1, 1)])
    with pytest.raises(StrategyError, match=r"state \(v\).*shape"):
        cls().aggregate(model, ups, [f32(0, 0), f32(0), f32(1, 1), f32(1, 1)])
    with pytest.raises(StrategyError, match="no updates"):
        cls().aggregate(model, [], None)


# --- Median and TrimmedMean ---------------------------------------------------------------


def test_median_odd_k():
    # coordinate 0: sorted [1, 3, 5] -> 3;  coordinate 1: sorted [-2, 4, 10] -> 4
    # (num_examples are ignored: a weighted mean would give something else)
    ups = [up("a", 100, [1, 10]), up("b", 1, [5, -2]), up("c", 1, [3, 4])]
    new, state = Median().aggregate([f32(0, 0)], ups, None)
    assert values(new) == [[3.0, 4.0]]
    assert state is None


def test_median_even_k():
    # coordinate 0: sorted [1, 3, 5, 100] -> (3 + 5)/2 = 4
    # coordinate 1: sorted [-2, 0, 4, 10] -> (0 + 4)/2 = 2
    ups = [up("a", 1, [1, 10]), up("b", 1, [5, -2]), up("c", 1, [3, 4]), up("d", 1, [100, 0])]
    new, _ = Median().aggregate([f32(0, 0)], ups, None)
    assert values(new) == [[4.0, 2.0]]


def test_median_multiple_arrays_and_errors():
    # array 1 (2x1): [[1],[2]], [[7],[0]], [[4],[9]] -> [[4],[2]]
    ups = [up("a", 1, [0], [[1], [2]]), up("b", 1, [1], [[7], [0]]), up("c", 1, [2], [[4], [9]])]
    new, _ = Median().aggregate([f32(0), np.zeros((2, 1), np.float32)], ups, None)
    assert values(new) == [[1.0], [[4.0], [2.0]]]
    with pytest.raises(StrategyError, match="no updates"):
        Median().aggregate([f32(0)], [], None)
    with pytest.raises(StrategyError, match=r"'b'.*has 2 arrays"):
        Median().aggregate([f32(0)], [up("a", 1, [1]), up("b", 1, [1], [2])], None)


def test_trimmed_mean_trims_each_side():
    # K = 5, trimFraction 0.2 -> floor(0.2*5) = 1 value dropped per side, per coordinate
    # coordinate 0: sorted [1, 2, 3, 4, 100]  -> drop 1, 100 -> (2 + 3 + 4)/3 = 3
    # coordinate 1: sorted [-50, 0, 0, 6, 6]  -> drop -50, 6 -> (0 + 0 + 6)/3 = 2
    ups = [
        up("a", 1, [100, 6]),
        up("b", 1, [2, -50]),
        up("c", 1, [4, 0]),
        up("d", 1, [1, 0]),
        up("e", 1, [3, 6]),
    ]
    new, state = TrimmedMean(trimFraction=0.2).aggregate([f32(0, 0)], ups, None)
    assert values(new) == [[3.0, 2.0]]
    assert state is None


def test_trimmed_mean_default_and_no_trim():
    # default 0.1 with K = 10 -> floor(1.0) = 1 per side:
    # values 1..9 and 1000 -> drop 1 and 1000 -> (2 + ... + 9)/8 = 44/8 = 5.5
    ups = [up(f"m{v}", 1, [v]) for v in [*range(1, 10), 1000]]
    new, _ = TrimmedMean().aggregate([f32(0)], ups, None)
    assert values(new) == [[5.5]]

    # K = 4 with 0.2 -> floor(0.8) = 0: plain mean (1 + 2 + 3 + 10)/4 = 4
    ups = [up(f"m{v}", 1, [v]) for v in [1, 2, 3, 10]]
    new, _ = TrimmedMean(trimFraction=0.2).aggregate([f32(0)], ups, None)
    assert values(new) == [[4.0]]


# --- parameters and registry --------------------------------------------------------------


def test_unknown_parameter_names_it_and_lists_known():
    with pytest.raises(StrategyError) as err:
        create("fedadam", {"betaOne": 0.5})
    msg = str(err.value)
    assert "'betaOne'" in msg
    assert "beta1, beta2, serverLearningRate, tau" in msg
    with pytest.raises(
        StrategyError, match=r"'beta2'.*known parameters: beta1, serverLearningRate"
    ):
        FedAdagrad(beta2=0.9)
    with pytest.raises(StrategyError, match=r"'trimFraction'.*known parameters: none"):
        Median(trimFraction=0.1)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("fedadam", {"tau": "abc"}, "'tau' must be a number"),
        ("fedadam", {"tau": True}, "'tau' must be a number"),
        ("fedadam", {"tau": [1e-3]}, "'tau' must be a number"),
        ("fedadam", {"tau": float("nan")}, "'tau' must be a number"),
        ("fedadam", {"tau": 0}, r"'tau' must be > 0"),
        ("fedyogi", {"beta1": 1.0}, r"'beta1' must be in \[0, 1\)"),
        ("fedyogi", {"beta2": -0.1}, r"'beta2' must be in \[0, 1\)"),
        ("fedadagrad", {"serverLearningRate": 0}, "'serverLearningRate' must be > 0"),
        ("trimmedmean", {"trimFraction": 0.5}, r"'trimFraction' must be in \[0, 0.5\)"),
        ("trimmedmean", {"trimFraction": -0.1}, r"'trimFraction' must be in \[0, 0.5\)"),
    ],
)
def test_bad_parameter_values(name, params, match):
    with pytest.raises(StrategyError, match=match):
        create(name, params)


def test_parameter_coercion():
    # ints are numbers; PyYAML reads "tau: 1e-3" as the string "1e-3"
    s = create("fedadam", {"serverLearningRate": 1, "tau": "1e-3"})
    assert s.values["serverLearningRate"] == 1.0
    assert isinstance(s.values["serverLearningRate"], float)
    assert s.values["tau"] == 0.001


def test_registry():
    assert set(STRATEGIES) == {
        "fedavg",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "median",
        "trimmedmean",
    }
    assert all(issubclass(cls, Strategy) and cls.name == key for key, cls in STRATEGIES.items())
    assert isinstance(create("fedavg"), FedAvg)
    assert isinstance(create("TrimmedMean", {"trimFraction": 0.2}), TrimmedMean)
    with pytest.raises(
        StrategyError, match="unknown strategy 'fedsgd'; known strategies: fedadagrad, "
    ):
        create("fedsgd")
    with pytest.raises(StrategyError, match="parameters must be a mapping"):
        create("fedavg", [("tau", 1)])
    assert issubclass(StrategyError, ValueError)
