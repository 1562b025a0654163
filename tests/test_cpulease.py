"""How co-located members share the cores: the plan the runner picks, and the lease itself."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from alliance.cpulease import CpuLease, CpuPlan, plan


def test_auto_shares_the_cores_among_all_members():
    # Measured (README "Performance", benchmarks/cpu_sharing.py): on 2 cores, 3 members at
    # once with one thread each beat taking turns with both cores.
    assert plan(2, 3) == CpuPlan(None, 1)
    assert plan(8, 3) == CpuPlan(None, 2)
    assert plan(1, 1) == CpuPlan(None, 1)


def test_explicit_modes():
    assert plan(2, 3, "turns") == CpuPlan(1, 2)
    assert plan(4, 3, "2") == CpuPlan(2, 2)
    assert plan(4, 3, "3") == CpuPlan(None, 1)  # as many slots as members: no lease
    assert plan(2, 3, "shared") == CpuPlan(None, 1)
    assert plan(2, 3, "turns").describe(3) == "taking turns, 2 CPU thread(s) each"


@pytest.mark.parametrize("mode", ["fast", "0", "-1", ""])
def test_a_bad_mode_is_named(mode):
    with pytest.raises(ValueError, match="CPU sharing"):
        plan(2, 3, mode)


def test_one_slot_lets_one_member_compute_at_a_time(tmp_path):
    lease = CpuLease(tmp_path, slots=1)
    inside, most = [0], [0]
    lock = threading.Lock()

    def work():
        with lease.hold():
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.1)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(3)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    assert time.monotonic() - started >= 0.3


def test_two_slots_let_two_compute_at_once(tmp_path):
    lease = CpuLease(tmp_path, slots=2)
    with lease.hold() as first, lease.hold() as second:
        assert first < 0.05 and second < 0.05
        stop = threading.Event()
        stop.set()
        with lease.hold(stop):  # a third waits; stopping ends the wait
            pass


def test_a_dead_holder_releases_its_lease(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from alliance.cpulease import CpuLease\n"
            f"h = CpuLease(Path({str(tmp_path)!r})).hold(); h.__enter__(); print('held', "
            "flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        stop = threading.Event()
        threading.Timer(0.3, holder.kill).start()
        with CpuLease(tmp_path).hold(stop) as waited:
            assert 0.2 < waited < 5
    finally:
        holder.kill()
        holder.wait()
