"""CheckBatch(100) against nginx with the geoip2 module: decisions per server CPU-second.

    python -m benchmarks.batch_peer                     # 5 alternating repeats of 5 s a side
    python -m benchmarks.batch_peer --repeats 2 --seconds 2
    python -m benchmarks.batch_peer --also /tmp/main    # a second pdp tree (say main) in the same run

Both servers get the same database (the demo GeoLite2-City 2018) and the same rule: deny
every participant located in CN, allow the rest (pdp: one rule, ``jurisdiction: [CN]``, no
meeting selector; nginx: ``geoip2`` on a request header, ``map`` CN to 403). Each server is
pinned to core 0 and started once; the load is on core 1: pdp's own engine (``pdp loadtest``'s,
through ``benchmarks.load``) sending CheckBatch of 100 participants, closed loop, and ``wrk``
sending one request per decision to nginx (one worker process, as many decisions per
request as nginx can make: one). The sides alternate repeat by repeat, so that whatever else
runs on the machine falls on both alike.

The figure is decisions per server CPU-second: the decisions answered in a repeat divided by
the user plus system CPU the server's processes spent during it (``/proc/<pid>/stat``; for
nginx the master and every worker). Before measuring, the same 100 addresses are asked of
both and their verdicts compared: the run stops if the two do not deny the same
participants.

Writes ``results/<date>-<HHMM>-batch.json`` (every repeat) and ``.md``: named to the minute, so that a
second run the same day keeps the first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import inprocess, nginx_peer
from benchmarks.harness import CLIENT_CORE, ROOT, SERVER_CORE, Server, pinned, run_load, write_results
from pdp.geo import demo_database_path

BATCH = 100
TARGET = 1.5  # issue 18: CheckBatch(100) at >= 1.5x nginx-geoip2 per server CPU-second
RULES = {
    "version": 1,
    "rules": [{"id": "cn-deny", "effect": "deny", "jurisdiction": ["CN"], "legal_basis": "Order 17/2020"}],
}
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _family(pid: int) -> list[int]:
    """``pid`` and its children (nginx's master and its workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


class Nginx:
    """nginx with the geoip2 module, started once, pinned to the server core."""

    def __init__(self, folder: Path, addresses: Path, port: int) -> None:
        self.folder, self.port, self.url = folder, port, f"http://127.0.0.1:{port}/"
        config = folder / "nginx.conf"
        affinity = "1" + "0" * SERVER_CORE
        config.write_text(
            nginx_peer.CONFIG.format(
                module=nginx_peer.MODULE, affinity=affinity, folder=folder, database=demo_database_path(), port=port
            )
        )
        self.script = folder / "addresses.lua"
        self.script.write_text(nginx_peer.WRK_SCRIPT.format(addresses=addresses))
        argv = pinned(SERVER_CORE, ["nginx", "-c", str(config), "-p", str(folder)])
        self.process = subprocess.Popen(argv, stderr=subprocess.DEVNULL)  # nginx logs to its error.log
        deadline = time.monotonic() + 30
        while self.status("127.0.0.1") is None:  # nginx prints nothing when it is ready
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"nginx did not start: {(folder / 'error.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def status(self, address: str) -> int | None:
        request = urllib.request.Request(self.url, headers={"X-Participant-IP": address})  # noqa: S310  # our http URL
        try:
            with urllib.request.urlopen(request, timeout=2) as answer:  # noqa: S310
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except OSError:
            return None

    def cpu_seconds(self) -> float:
        # taskset execs nginx, so the Popen pid is nginx's master.
        return sum(_cpu_seconds(pid) for pid in _family(self.process.pid))

    def repeat(self, seconds: float, connections: int) -> dict[str, Any]:
        before = self.cpu_seconds()
        wrk = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(self.script), self.url]
        run = subprocess.run(pinned(CLIENT_CORE, wrk), capture_output=True, text=True, check=True)
        cpu = self.cpu_seconds() - before
        requests = int(re.search(r"(\d+) requests in", run.stdout)[1])  # type: ignore[index]
        elapsed = re.search(r"requests in ([\d.]+)(\w+),", run.stdout)
        errors = re.search(r"Socket errors: (.*)", run.stdout)
        denied = re.search(r"Non-2xx or 3xx responses: (\d+)", run.stdout)
        return {
            "decisions": requests,
            "seconds": _seconds(elapsed[1], elapsed[2]) if elapsed else seconds,
            "server_cpu_s": round(cpu, 3),
            "decisions_per_cpu_s": round(requests / cpu) if cpu else None,
            "denied": int(denied[1]) if denied else 0,
            "socket_errors": errors[1] if errors else "",
        }

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _seconds(value: str, unit: str) -> float:
    return float(value) * {"ms": 0.001, "s": 1.0, "m": 60.0}.get(unit, 1.0)


def start_pdp(tree: Path, listen: str, rules: Path) -> Server:
    """``pdp serve`` from the source tree ``tree``, pinned to the server core."""
    argv = [sys.executable, "-m", "pdp", "serve", "--listen", listen, "--snapshot", str(rules),
            "--geoip-db", "demo", "--log-format", "text"]  # fmt: skip
    return Server.start(argv, cwd=tree)


def pdp_repeat(server: Server, addresses: Path, seconds: float, in_flight: int, batch: int = BATCH) -> dict[str, Any]:
    before = server.cpu_seconds()
    result = run_load(
        "--target", server.address, "--addresses", str(addresses), "--mode", "closed",
        "--in-flight", str(in_flight), "--rpc", "batch", "--batch", str(batch),
        "--seconds", str(seconds), "--warmup", "0",
    )  # fmt: skip
    cpu = server.cpu_seconds() - before
    return {
        "decisions": result["decisions"],
        "seconds": result["seconds"],
        "server_cpu_s": round(cpu, 3),
        "decisions_per_cpu_s": round(result["decisions"] / cpu) if cpu else None,
        "errors": result["errors"],
        "latency_us": result["latency_us"],
        "client_cpu_s": result["client_cpu_seconds"],
    }


# Run with the source tree to measure as the working directory, so that its pdp is imported.
INPROCESS = """
import json, statistics, sys, time
from benchmarks import inprocess
from pdp import servicer
from pdp.decisions import DecisionPath
from pdp.geo import GeoDatabase, demo_database_path
from pdp.loadtest.run import build_requests
from pdp.rules import parse_policy
from pdp.state import PolicyHolder

class Details:  # what grpc hands a generic handler to find the method
    method, invocation_metadata = "/pdp.v1.AdmissionService/CheckBatch", ()
raw = [r.SerializeToString() for r in build_requests(inprocess.located_addresses(20_000), 100)]
geo = GeoDatabase(demo_database_path())
figures = {}
for name, rules in (("one CN rule", json.dumps(RULES).encode()), ("10,000 rules", inprocess.make_rules(10_000))):
    holder = PolicyHolder()
    holder.activate(parse_policy(rules, "rules.json"), geo, "rules.json")
    method = servicer.admission_handlers(servicer.AdmissionServicer(DecisionPath(holder), 1000, 8)).service(Details())
    decode, call = method.request_deserializer or (lambda data: data), method.unary_unary
    passes = []
    for _ in range(16):
        started = time.thread_time()
        for data in raw:
            call(decode(data), None)
        passes.append((time.thread_time() - started) / len(raw) * 1e6)
    passes = passes[1:]  # the first fills the caches
    figures[name] = {"min_us": round(min(passes), 1), "median_us": round(statistics.median(passes), 1)}
print(json.dumps(figures))
"""


def inprocess_costs(tree: Path) -> dict[str, Any]:
    """CPU µs per CheckBatch(100) through the tree's own CheckBatch method (its decoding and handler), in
    process (``time.thread_time``), with ``tree``'s pdp; no gRPC."""
    code = f"RULES = {RULES!r}\n{INPROCESS}"
    run = subprocess.run(
        pinned(SERVER_CORE, [sys.executable, "-c", code]), capture_output=True, text=True, cwd=tree, check=True
    )
    figures: dict[str, Any] = json.loads(run.stdout)
    return figures


def same_verdicts(server: Server, nginx: Nginx, addresses: list[str]) -> dict[str, int]:
    """Ask both for the same participants; raise unless they deny exactly the same ones."""
    from pdp.client import Client

    with Client(server.address) as client:
        answers = client.check_batch("m-loadtest", addresses, tags=["memorial"], host_account_id="account-1")
    pdp_denied = [address for address, answer in zip(addresses, answers, strict=True) if answer.verdict.name == "DENY"]
    nginx_denied = [address for address in addresses if nginx.status(address) == 403]
    if pdp_denied != nginx_denied:
        raise RuntimeError(f"pdp and nginx disagree: pdp denies {pdp_denied}, nginx {nginx_denied}")
    return {"asked": len(addresses), "denied_by_both": len(pdp_denied)}


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    sides: dict[str, Any] = {}
    for name, repeats in runs.items():
        per_cpu = [run["decisions_per_cpu_s"] for run in repeats if run["decisions_per_cpu_s"]]
        sides[name] = {
            "decisions_per_cpu_s": round(statistics.median(per_cpu)),
            "range": [min(per_cpu), max(per_cpu)],
            "decisions_per_s": round(statistics.median(run["decisions"] / run["seconds"] for run in repeats)),
            "server_cpu_share": round(statistics.median(run["server_cpu_s"] / run["seconds"] for run in repeats), 3),
        }
    nginx = sides["nginx-geoip2"]["decisions_per_cpu_s"]
    for side in sides.values():
        side["ratio_to_nginx"] = round(side["decisions_per_cpu_s"] / nginx, 3)
    pairs = [
        pdp["decisions_per_cpu_s"] / peer["decisions_per_cpu_s"]
        for pdp, peer in zip(runs["pdp"], runs["nginx-geoip2"], strict=True)
    ]
    return {"sides": sides, "ratio_per_repeat": [round(ratio, 3) for ratio in pairs]}


def markdown(result: dict[str, Any]) -> list[str]:
    sides = result["summary"]["sides"]
    lines = [
        f"## CheckBatch({BATCH}) against nginx-geoip2, per server CPU-second",
        "",
        f"Run of {result['started']} ({result['repeats']} alternating repeats of {result['seconds']:g} s a side; "
        f"load average {result['load_average'][0]:.2f} before, {result['load_average'][1]:.2f} after). "
        f"Same database, same CN deny rule; verdicts checked equal on {result['verdicts']['asked']} addresses "
        f"({result['verdicts']['denied_by_both']} denied by both).",
        "",
        "| side | decisions per server CPU-s (median) | range | decisions/s | server core busy | ÷ nginx |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, side in sides.items():
        low, high = side["range"]
        lines.append(
            f"| {name} | {side['decisions_per_cpu_s']:,} | {low:,}–{high:,} | {side['decisions_per_s']:,} | "
            f"{side['server_cpu_share']:.0%} | {side['ratio_to_nginx']:.2f}× |"
        )
    ratio = sides["pdp"]["ratio_to_nginx"]
    per_repeat = ", ".join(f"{value:.2f}" for value in result["summary"]["ratio_per_repeat"])
    lines += [
        "",
        f"pdp ÷ nginx per repeat: {per_repeat}. Target ≥ {TARGET}×: **{'met' if ratio >= TARGET else 'missed'}** "
        f"({ratio:.2f}×).",
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--in-flight", type=int, default=4, help="pdp: CheckBatch calls in flight (default 4)")
    parser.add_argument("--connections", type=int, default=16, help="wrk: connections to nginx (default 16)")
    parser.add_argument("--also", type=Path, action="append", default=[], help="another pdp source tree to run too")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the results")
    parser.add_argument("--inprocess", action="store_true", help="only the in-process cost, of each tree, alternating")
    options = parser.parse_args()
    if options.inprocess:
        trees = [ROOT, *(tree.resolve() for tree in options.also)]
        for repeat in range(options.repeats):
            for tree in trees:
                print(f"{repeat + 1} {tree.name}: {json.dumps(inprocess_costs(tree))}", flush=True)
        return 0
    missing = nginx_peer.available()
    if missing:
        print(f"skipped: {missing}", file=sys.stderr)
        return 0
    folder = Path(tempfile.mkdtemp(prefix="pdp-batch-peer-"))
    located = inprocess.located_addresses(20_000)
    addresses = folder / "addresses.txt"
    addresses.write_text("\n".join(located))
    rules = folder / "rules.json"
    rules.write_text(json.dumps(RULES))
    servers = {"pdp": start_pdp(ROOT, f"unix:{folder}/pdp.sock", rules)}
    for number, tree in enumerate(options.also, start=1):
        servers[f"pdp ({tree.resolve().name})"] = start_pdp(tree.resolve(), f"unix:{folder}/also-{number}.sock", rules)
    nginx = Nginx(folder, addresses, port=18480)
    load_before = os.getloadavg()[0]
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*servers, "nginx-geoip2"]}
    try:
        verdicts = same_verdicts(servers["pdp"], nginx, located[:BATCH])
        for server in servers.values():  # warm the location caches with every address once
            run_load("--target", server.address, "--addresses", str(addresses), "--mode", "closed",
                     "--rpc", "batch", "--batch", str(BATCH), "--seconds", "2", "--warmup", "0")  # fmt: skip
        nginx.repeat(1.0, options.connections)
        for repeat in range(options.repeats):
            for name, server in servers.items():
                runs[name].append(pdp_repeat(server, addresses, options.seconds, options.in_flight))
            runs["nginx-geoip2"].append(nginx.repeat(options.seconds, options.connections))
            figures = ", ".join(f"{name} {rs[-1]['decisions_per_cpu_s']:,}/CPU-s" for name, rs in runs.items())
            print(f"repeat {repeat + 1}: {figures}", file=sys.stderr, flush=True)
    finally:
        nginx.stop()
        for server in servers.values():
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    result = {
        "started": started,
        "repeats": options.repeats,
        "seconds": options.seconds,
        "batch": BATCH,
        "in_flight": options.in_flight,
        "wrk_connections": options.connections,
        "load_average": [load_before, os.getloadavg()[0]],
        "verdicts": verdicts,
        "runs": runs,
        "summary": summary(runs),
    }
    write_results(options.out, "batch", result, "\n".join(markdown(result)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
