"""A steady flood of silent calls against a real `pdp serve` (the guarantee the 40
threads of `--workers 8` are kept for; README, "Fewer threads, tried and not kept").

The receive guard ends a silent call once it has waited :data:`pdp.receiving.PATIENCE`
while its 4 x ``--workers`` waiting threads are taken, so those threads absorb a flood
of up to ``4 x workers / PATIENCE`` silent calls a second (320 for `--workers 8`) and
the deciding threads stay free for honest calls. With a pool only as large as
``--workers`` (tried on main for an hour, `61ecfd8`..`7651d94`), 18 of this test's 80
Checks missed their 3 s deadline.

The server runs in its own process, as in production: a flood sent from the server's
own process would compete with it for the GIL, which no meeting node's client does.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import grpc

from pdp.client import Client
from pdp.model import Verdict

from .conftest import CITY_DB
from .test_hardening_transport import CN, PDP, RULES, HalfOpen

SILENT_PER_SECOND = 200  # well within what 8 workers absorb, and 2.5 x what a pool of 8 threads did
CHECK_EVERY = 0.05  # seconds
DEADLINE = 3.0  # seconds: a meeting node's join is not held longer
ENDED_LOG = re.compile(r"(\d+) as the longest waiting")


def test_a_steady_flood_of_silent_calls_never_keeps_a_check_past_its_deadline(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    target = f"unix:{tmp_path}/run/pdp.sock"
    server = subprocess.Popen(
        [*PDP, "serve", "--listen", target, "--snapshot", str(rules), "--geoip-db", str(CITY_DB), "--workers", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stop = threading.Event()
    threads: list[threading.Thread] = []
    flood: HalfOpen | None = None
    failed: dict[str, int] = {}
    answered = 0
    try:
        assert server.stdout is not None
        assert "listening on" in server.stdout.readline()
        flood = HalfOpen(target)
        silent = flood

        def open_silent_calls() -> None:
            # The pace is the load under test, not a synchronisation.
            began = time.monotonic()
            while not stop.is_set():
                silent.open("/pdp.v1.AdmissionService/Check", 1)
                ahead = began + len(silent.streams) / SILENT_PER_SECOND - time.monotonic()
                if ahead > 0:
                    stop.wait(ahead)

        def read_what_the_server_ends() -> None:
            silent.sock.settimeout(None)
            try:
                while silent.read():
                    pass
            except ConnectionResetError:  # the server stopped at the test's end
                pass

        threads = [threading.Thread(target=open_silent_calls), threading.Thread(target=read_what_the_server_ends)]
        for thread in threads:
            thread.start()
        with Client(target, timeout=DEADLINE) as client:
            for _ in range(80):  # 4 s of flood, a Check every 50 ms
                try:
                    assert client.check(CN, "m").verdict == Verdict.DENY
                    answered += 1
                except grpc.RpcError as error:
                    failed[error.code().name] = failed.get(error.code().name, 0) + 1
                stop.wait(CHECK_EVERY)
        opened = len(flood.streams)
        ended = len(flood.ended)
    finally:
        stop.set()
        if threads:
            threads[0].join()  # no more calls opened
        server.terminate()  # its connection closes: the reader sees the end
        _, stderr = server.communicate(timeout=60)
        for thread in threads[1:]:
            thread.join()
        if flood is not None:
            flood.close()
    assert failed == {}, f"{failed} of {answered + sum(failed.values())} Checks failed under the flood"
    # The flood was one: the guard crowded out silent calls, and the server ended most of them.
    assert opened >= 4 * SILENT_PER_SECOND * 0.9
    assert ended >= opened / 2
    crowded_out = [int(count) for count in ENDED_LOG.findall(stderr)]
    assert crowded_out, stderr[-2000:]
    assert crowded_out[-1] >= opened / 2
