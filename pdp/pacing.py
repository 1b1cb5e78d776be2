"""Compiling in the background of requests, in one interpreter.

A compile is CPU-bound Python; request threads hold the interpreter for a few
microseconds at a time and then wait on I/O. Left alone, CPython hands a
CPU-bound thread the interpreter for 5 ms whenever a request thread lets go of
it (the switch interval), so every step of every call waits behind the compile
(the "convoy effect"), and a server at 60 % load falls behind for as long as
the compile lasts. Measured with one activation of a 10,000-rule snapshot a
second at 60 % load, recompiling it whole: p99 90-110 ms against 1.3 ms steady,
20-50 ms with this module. (A snapshot with few changed rules now costs about
10 ms of CPU in all, see pdp.rules, and the pacing matters less there.)

:func:`in_background` bounds both sides: the switch interval is shortened while
any compile runs, so a request waits at most about 0.1 ms to get in, and the
compile sleeps after each slice of work in proportion to it, so that it never
takes more than a set share of the interpreter and the server keeps up.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["in_background"]

FINE_SWITCH_SECONDS = 0.0001
COMPILE_SHARE = 0.25  # of the interpreter's time, while a compile runs
_MAX_REST_SECONDS = 0.005

_lock = threading.Lock()
_compiles = 0
_usual_switch_seconds = sys.getswitchinterval()


class _Pacer:
    """Called between slices of work: rests long enough to keep to ``share``."""

    def __init__(self, share: float) -> None:
        self.rest_per_work = (1.0 - share) / share
        self.resumed = time.perf_counter()

    def __call__(self) -> None:
        worked = time.perf_counter() - self.resumed
        time.sleep(min(worked * self.rest_per_work, _MAX_REST_SECONDS))
        self.resumed = time.perf_counter()


@contextlib.contextmanager
def in_background(share: float = COMPILE_SHARE) -> Iterator[Callable[[], None]]:
    """Yield a ``pace`` function for the compile to call between slices.

    The shorter switch interval is not kept for good: outside compiles it costs
    requests more switches than it saves them waiting (measured: worse steady
    p50). Nested and concurrent uses are counted; the last one restores it.
    """
    global _compiles
    with _lock:
        if _compiles == 0:
            sys.setswitchinterval(FINE_SWITCH_SECONDS)
        _compiles += 1
    try:
        yield _Pacer(share)
    finally:
        with _lock:
            _compiles -= 1
            if _compiles == 0:
                sys.setswitchinterval(_usual_switch_seconds)
