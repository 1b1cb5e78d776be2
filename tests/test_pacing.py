"""pdp.pacing: the switch interval is shortened only while compiles run."""

from __future__ import annotations

import sys
import threading

import pytest

from pdp.pacing import FINE_SWITCH_SECONDS, in_background


def test_the_switch_interval_is_fine_only_while_a_compile_runs() -> None:
    usual = sys.getswitchinterval()
    assert usual != FINE_SWITCH_SECONDS
    with in_background() as pace:
        assert sys.getswitchinterval() == pytest.approx(FINE_SWITCH_SECONDS)
        pace()
    assert sys.getswitchinterval() == usual


def test_overlapping_compiles_restore_the_interval_only_when_the_last_ends() -> None:
    usual = sys.getswitchinterval()
    first_inside = threading.Event()
    second_done = threading.Event()
    seen: list[float] = []

    def second() -> None:
        first_inside.wait()
        with in_background():
            pass
        seen.append(sys.getswitchinterval())  # the first compile still runs
        second_done.set()

    worker = threading.Thread(target=second)
    worker.start()
    with in_background():
        first_inside.set()
        assert second_done.wait(10)
    worker.join()
    assert seen == [pytest.approx(FINE_SWITCH_SECONDS)]
    assert sys.getswitchinterval() == usual


def test_an_exception_in_a_compile_restores_the_interval() -> None:
    usual = sys.getswitchinterval()
    with pytest.raises(ValueError, match="bad snapshot"), in_background():
        raise ValueError("bad snapshot")
    assert sys.getswitchinterval() == usual
