"""The `pdp` command as users run it: real processes, real exit codes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdp.config import ConfigError, ServeConfig, resolve

from .conftest import BAD_DATA, CITY_DB, CN_MEMORIAL, ROOT
from .servers import RedisServer

PDP = [sys.executable, "-m", "pdp"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    return subprocess.run([*PDP, *args], capture_output=True, text=True, timeout=60, env=environment, check=False)


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(CN_MEMORIAL)
    return path


@pytest.fixture
def served(tmp_path: Path, rules_file: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`pdp serve` on a Unix socket, returned once it prints where it listens."""
    target = f"unix:{tmp_path}/pdp.sock"
    process = subprocess.Popen(
        [*PDP, "serve", "--listen", target, "--snapshot", str(rules_file), "--geoip-db", str(CITY_DB)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    banner = process.stdout.readline()  # blocks until the server is up (or has died)
    assert f"listening on {target}" in banner, (banner, process.stderr.read() if process.stderr else "")
    assert process.stdout.readline().startswith(f"try: {shlex.quote(sys.executable)} -m pdp check --target {target}")
    yield process, target
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=30)


def test_serve_check_and_sigterm(served: tuple[subprocess.Popen[str], str]) -> None:
    process, target = served
    deny = run("check", "--target", target, "--ip", "175.16.199.1", "--meeting", "m-1", "--tag", "memorial")
    assert deny.returncode == 3, deny.stderr
    assert deny.stdout.splitlines()[0] == "DENY  cn-memorial"
    assert "legal basis  Order 17/2020" in deny.stdout
    assert "location     CN (CN-22)" in deny.stdout

    allow = run("check", "--target", target, "--ip", "2001:2e0::1", "--meeting", "m-1", "--tag", "memorial", "--json")
    assert allow.returncode == 0, allow.stderr
    document = json.loads(allow.stdout)
    assert document["verdict"] == "ALLOW"
    assert document["location"] == {"found": True, "country": "HK", "subdivisions": []}
    assert document["policy_version"] == 7

    bad = run("check", "--target", target, "--ip", "1.2.3.4:80", "--meeting", "m")
    assert bad.returncode == 2
    assert "INVALID_ARGUMENT: participant.ip: '1.2.3.4:80'" in bad.stderr

    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "SIGTERM received: draining" in stderr
    assert "Traceback" not in stderr


def test_check_against_nothing_is_a_transport_error(tmp_path: Path) -> None:
    result = run(
        "check", "--target", f"unix:{tmp_path}/none.sock", "--ip", "1.1.1.1", "--meeting", "m", "--timeout", "0.5"
    )
    assert result.returncode == 2
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr


@pytest.mark.parametrize(
    ("extra", "env", "expected"),
    [
        (["--snapshot", "{bad_rules}"], {}, "rules.yaml:4: rules[0] (x).jurisdiction: 'XX' is not"),
        (["--snapshot", "{bad_rules}"], {}, "rules.yaml:3: rules[0] (x).legal_basis: required"),
        (["--geoip-db", "{tmp}/absent.mmdb"], {}, "absent.mmdb: no such GeoIP database file"),
        (
            ["--geoip-db", str(BAD_DATA / "maxminddb-golang" / "cyclic-data-structure.mmdb")],
            {},
            "not a valid MaxMind database",
        ),
        (
            ["--geoip-db", str(BAD_DATA / "libmaxminddb" / "libmaxminddb-deep-nesting.mmdb")],
            {},
            "corrupt MaxMind database",
        ),
        (["--geoip-sha256-file", "{tmp}/garbled.sha256"], {}, "garbled.sha256:1: expected the database's SHA-256"),
        (["--geoip-sha256-file", "{tmp}/other.sha256"], {}, "is not the pinned 0000000000000000..."),
        (["--listen", "0.0.0.0"], {}, "--listen: '0.0.0.0' is not HOST:PORT"),  # noqa: S104  # refused, not bound
        (["--cache-size", "0"], {}, "--cache-size: 0 is not a positive integer"),
        ([], {"PDP_WORKERS": "many"}, "environment variable PDP_WORKERS: 'many' is not an integer"),
        (["--config", "{tmp}/pdp.yaml"], {}, "pdp.yaml:2: unknown setting 'colour'"),
        (["--snapshot", ""], {"PDP_SNAPSHOT_URL": ""}, "no snapshot: pass --snapshot"),
        (["--snapshot", "ftp://store.example/rules.yaml"], {}, "snapshot URLs are file://, http(s):// or redis://"),
        (["--snapshot-pubkey", "{tmp}/absent.pub"], {}, "--snapshot-pubkey: "),
    ],
)
def test_serve_refuses_bad_start_up_input(
    tmp_path: Path, rules_file: Path, extra: list[str], env: dict[str, str], expected: str
) -> None:
    bad_rules = tmp_path / "rules.yaml"
    bad_rules.write_text("version: 1\nrules:\n  - id: x\n    jurisdiction: [XX]\n    effect: deny\n")
    (tmp_path / "pdp.yaml").write_text("listen: unix:/tmp/x.sock\ncolour: blue\n")
    (tmp_path / "garbled.sha256").write_text("not a digest\n")
    (tmp_path / "other.sha256").write_text("0" * 64 + "  GeoIP2-City-Test.mmdb\n")
    base = ["--listen", f"unix:{tmp_path}/s.sock", "--snapshot", str(rules_file), "--geoip-db", str(CITY_DB)]
    substitutions = {"bad_rules": str(bad_rules), "tmp": str(tmp_path)}
    result = run("serve", *base, *[arg.format(**substitutions) for arg in extra], env=env)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_port_in_use(served: tuple[subprocess.Popen[str], str], rules_file: Path) -> None:
    _, target = served
    result = run("serve", "--listen", target, "--snapshot", str(rules_file), "--geoip-db", str(CITY_DB))
    assert result.returncode == 2
    assert "another server is listening on this socket" in result.stderr


def test_explain_shows_every_rule_of_the_jurisdiction(rules_file: Path) -> None:
    result = run(
        "explain",
        "--rules",
        str(rules_file),
        "--geoip-db",
        str(CITY_DB),
        "--ip",
        "175.16.199.1",
        "--meeting",
        "m",
        "--tag",
        "memorial",
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines()[0] == "DENY  cn-memorial"
    assert "decided" in result.stdout

    hypothetical = run(
        "explain", "--rules", str(rules_file), "--country", "US", "--subdivision", "US-WA", "--meeting", "m", "--json"
    )
    assert hypothetical.returncode == 3
    assert json.loads(hypothetical.stdout)["rules"] == [{"id": "us-wa", "outcome": "decided"}]

    outside = run("explain", "--rules", str(rules_file), "--country", "HK", "--meeting", "m")
    assert outside.returncode == 0
    assert "no rule's jurisdiction covers HK" in outside.stdout

    earlier = run(
        "explain",
        "--rules",
        str(ROOT / "examples" / "rules.yaml"),
        "--country",
        "US",
        "--subdivision",
        "US-WA",
        "--action",
        "host",
        "--meeting",
        "m",
        "--at",
        "2025-06-01T00:00:00Z",
    )
    assert earlier.returncode == 0
    assert "not yet valid" in earlier.stdout


def test_geo_lookup(tmp_path: Path) -> None:
    result = run("geo", "lookup", "--geoip-db", str(CITY_DB), "81.2.69.143", "2001:480:10::1", "10.0.0.1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# GeoIP2-City built ")
    assert lines[1].split() == ["81.2.69.143", "GB", "(GB-ENG)"]
    assert lines[2].split() == ["2001:480:10::1", "US", "(US-CA)"]
    assert lines[3].startswith("10.0.0.1")
    assert "unknown" in lines[3]

    as_json = run("geo", "lookup", "--json", "2001:2e0::1", env={"PDP_GEOIP_DB": str(CITY_DB)})
    (row,) = json.loads(as_json.stdout)
    assert {key: row[key] for key in ("ip", "found", "country", "subdivisions", "located", "via")} == {
        "ip": "2001:2e0::1",
        "found": True,
        "country": "HK",
        "subdivisions": [],
        "located": "2001:2e0::1",
        "via": "",
    }

    bad = run("geo", "lookup", "--geoip-db", str(CITY_DB), "1.2.3")
    assert bad.returncode == 2
    assert "1.2.3: '1.2.3' is not an IPv4 or IPv6 address" in bad.stderr

    nothing = run("geo", "lookup", "1.1.1.1", env={"PDP_GEOIP_DB": ""})
    assert nothing.returncode == 2
    assert "no GeoIP database" in nothing.stderr


def test_snapshot_validate_exit_codes(tmp_path: Path, rules_file: Path) -> None:
    good = run("snapshot", "validate", str(rules_file))
    assert good.returncode == 0
    assert "valid, version 7: 2 rules (2 deny, 0 allow, 0 shadow) over 2 jurisdictions" in good.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - {id: a, effect: deny, jurisdiction: [CN]}\n  - {id: a}\n")
    invalid = run("snapshot", "validate", str(rules_file), str(bad))
    assert invalid.returncode == 1
    assert f"{bad}: snapshot rejected, 4 problems:" in invalid.stderr
    assert f"{bad}:4: rules[1] (a).id: duplicate rule id" in invalid.stderr

    unreadable = run("snapshot", "validate", str(tmp_path / "absent.yaml"))
    assert unreadable.returncode == 2
    assert "absent.yaml: cannot read" in unreadable.stderr


def test_help_names_every_command() -> None:
    result = run("--help")
    for command in ("serve", "check", "explain", "geo", "snapshot"):
        assert command in result.stdout
    assert "PDP_SNAPSHOT_URL" in run("serve", "--help").stdout


# --------------------------------------------------------------------------- configuration


def test_flags_beat_environment_beat_config_file(tmp_path: Path) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text("cache-size: 10\nbatch_limit: 20\nworkers: 3\n")
    resolved = resolve(
        {"config": str(config), "batch_limit": "200"},
        {"PDP_CACHE_SIZE": "100", "PDP_BATCH_LIMIT": "2000", "PDP_GEOIP_DB": "/db.mmdb"},
    )
    assert (resolved.cache_size, resolved.batch_limit, resolved.workers) == (100, 200, 3)
    assert resolved.geoip_db == "/db.mmdb"
    assert resolved.listen == ServeConfig().listen == "127.0.0.1:50051"


def test_config_file_comes_from_pdp_config_and_plain_paths_become_urls(tmp_path: Path) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text("snapshot: rules.yaml\n")
    resolved = resolve({}, {"PDP_CONFIG": str(config)})
    assert resolved.snapshot.startswith("file:///")
    assert resolved.snapshot.endswith("/rules.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n", ":1: the config file must be a mapping"),
        ("workers: [1]\n", ":1: workers must be a single value"),
        ("listen: 'nowhere'\n", ":1: listen: 'nowhere' is not HOST:PORT"),
        ("grace_seconds: -1\n", "outside 0..3600"),
        ("a: [\n", "invalid YAML"),
    ],
)
def test_config_file_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=r"pdp\.yaml") as caught:
        resolve({"config": str(config)}, {})
    assert message in str(caught.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:50051", "localhost:1", "unix:/run/pdp.sock"])
def test_listen_addresses_accepted(listen: str) -> None:
    assert resolve({"listen": listen}, {}).listen == listen


# --------------------------------------------------------------------------- keys, signing, publishing, status


def test_keygen_sign_publish_and_serve_a_signed_redis_snapshot(
    tmp_path: Path, rules_file: Path, redis_server: RedisServer
) -> None:
    keygen = run("keygen", "--out", str(tmp_path / "ops"))
    assert keygen.returncode == 0, keygen.stderr
    assert (tmp_path / "ops.key").stat().st_mode & 0o777 == 0o600
    assert run("keygen", "--out", str(tmp_path / "ops")).returncode == 2  # never overwrites

    signed = run("snapshot", "sign", str(rules_file), "--key", str(tmp_path / "ops.key"), "--out", "-")
    assert signed.returncode == 0
    assert json.loads(signed.stdout)["version"] == 7

    url = redis_server.url("pdp:cli")
    published = run("snapshot", "publish", str(rules_file), "--to", url, "--key", str(tmp_path / "ops.key"))
    assert published.returncode == 0, published.stderr
    assert "published version 7 (signed)" in published.stdout

    target = f"unix:{tmp_path}/pdp.sock"
    process = subprocess.Popen(
        [*PDP, "serve", "--listen", target, "--snapshot", url, "--geoip-db", str(CITY_DB),
         "--snapshot-pubkey", str(tmp_path / "ops.pub"), "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert "policy version 7 (2 rules)" in process.stdout.readline()
        status = run("status", "--target", target, "--json")
        assert status.returncode == 0, status.stderr
        document = json.loads(status.stdout)
        assert (document["policy_version"], document["policy_source"], document["stale"]) == ("7", url, False)
        # "unchanged" once the subscriber, subscribed after the first fetch, has had it look again
        assert document["last_fetch_result"] in ("activated version 7", "unchanged")
        assert (tmp_path / "state" / "snapshot").is_file()
        deny = run("check", "--target", target, "--ip", "175.16.199.1", "--meeting", "m", "--tag", "memorial")
        assert deny.returncode == 3
    finally:
        process.terminate()
        process.communicate(timeout=30)

    unsigned = run("snapshot", "publish", str(rules_file), "--to", "https://store.example/rules")
    assert unsigned.returncode == 2
    assert "upload to HTTP stores with their own tools" in unsigned.stderr


def test_serve_without_a_snapshot_file_waits_not_serving(tmp_path: Path, rules_file: Path) -> None:
    target = f"unix:{tmp_path}/pdp.sock"
    missing = tmp_path / "later.yaml"
    process = subprocess.Popen(
        [*PDP, "serve", "--listen", target, "--snapshot", str(missing), "--geoip-db", str(CITY_DB),
         "--poll-seconds", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert "NOT SERVING on" in process.stdout.readline()
        waiting = run("status", "--target", target)
        assert waiting.returncode == 2
        assert "later.yaml" in waiting.stdout
        unavailable = run("check", "--target", target, "--ip", "175.16.199.1", "--meeting", "m")
        assert unavailable.returncode == 2
        assert "UNAVAILABLE: no policy" in unavailable.stderr

        from pdp.client import Client

        with Client(target, timeout=30) as client:
            events = client.watch_policy(timeout=30)
            shutil.copy(rules_file, missing)
            assert next(events).policy_version == 7  # the first event is the first activation
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_recheck_example_runs_against_a_real_sidecar(served: tuple[subprocess.Popen[str], str], tmp_path: Path) -> None:
    _, target = served
    # The example's own meetings.json uses real addresses for the demo database; the
    # test database knows other ones: the same meetings, located in CN, US and HK.
    meetings = json.loads((ROOT / "examples" / "meetings.json").read_text())
    replacements = {"1.0.1.1": "175.16.199.1", "8.8.8.8": "2001:480:10::1", "202.45.84.58": "2001:2e0::1"}
    for meeting in meetings.values():
        for person in meeting["participants"]:
            person["ip"] = replacements[person["ip"]]
    (tmp_path / "meetings.json").write_text(json.dumps(meetings))
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "recheck.py"), "--target", target,
         "--meetings", str(tmp_path / "meetings.json"), "--once"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "policy version 7 active: re-checking 2 meetings" in result.stdout
    assert "remove u-1 from m-1: cn-memorial" in result.stdout
    assert "u-2" not in result.stdout  # US: outside the jurisdiction
    assert "u-3" not in result.stdout  # HK: outside the jurisdiction


def test_every_error_a_user_can_cause_is_a_pdp_error() -> None:
    """cli.main turns PdpError into a message and exit 2, and nothing else: a
    ValueError from a bug keeps its traceback instead of passing as bad input."""
    from pdp.app import SetupError
    from pdp.audit import AuditError
    from pdp.cli import UsageError
    from pdp.config import ConfigError
    from pdp.decisions import NotReadyError, RequestError
    from pdp.errors import PdpError
    from pdp.geo import GeoIPError, InvalidAddressError
    from pdp.publish import PublishError
    from pdp.reload import SnapshotRejectedError, StartupError
    from pdp.report import ReportError
    from pdp.rules import SnapshotError
    from pdp.signing import SignatureError
    from pdp.sources.base import SourceError
    from pdp.telemetry import TelemetryError

    errors = [SetupError, AuditError, UsageError, ConfigError, NotReadyError, RequestError, GeoIPError,
              InvalidAddressError, PublishError, SnapshotRejectedError, StartupError, ReportError, SnapshotError,
              SignatureError, SourceError, TelemetryError]  # fmt: skip
    assert [error.__name__ for error in errors if not issubclass(error, PdpError)] == []


def test_a_bug_is_not_reported_as_bad_input(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A ValueError that is not a PdpError is a bug: it propagates (a traceback,
    exit 1) instead of becoming "pdp: ..." and exit 2 like a user's mistake."""
    from pdp import cli

    def buggy(options: object) -> int:
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "cmd_keygen", buggy)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["keygen", "--out", str(tmp_path / "k")])


@pytest.mark.parametrize("via", ["flag", "env"])
def test_every_command_that_verifies_names_a_bad_pubkey_the_same_way(
    tmp_path: Path, rules_file: Path, via: str
) -> None:
    """snapshot diff, promote and impact share one --pubkey (pdp/commands/keys.py):
    a key file that is missing, given as --pubkey or in PDP_SNAPSHOT_PUBKEY, is
    refused with exit 2 and one message naming where it was given and the file."""
    missing = tmp_path / "missing.pem"
    log = tmp_path / "audit.log"
    log.write_text("")
    commands = {
        "diff": ["snapshot", "diff", str(rules_file), str(rules_file)],
        "promote": ["snapshot", "promote", str(rules_file), "--to", f"file://{tmp_path}/out.yaml"],
        "impact": ["snapshot", "impact", str(rules_file), "--audit-log", str(log)],
    }
    for name, arguments in commands.items():
        if via == "flag":
            result = run(*arguments, "--pubkey", str(missing), env={"PDP_SNAPSHOT_PUBKEY": ""})
        else:
            result = run(*arguments, env={"PDP_SNAPSHOT_PUBKEY": f" {missing} ,"})
        assert result.returncode == 2, (name, result.stderr)
        named = "--pubkey" if via == "flag" else "PDP_SNAPSHOT_PUBKEY"
        assert result.stderr.startswith(f"pdp: {named}: {missing}: not a readable PEM public key"), (
            name,
            result.stderr,
        )
    assert not (tmp_path / "out.yaml").exists()
