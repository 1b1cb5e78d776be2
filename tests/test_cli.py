"""The `pdp` command as users run it: real processes, real exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdp.config import ConfigError, ServeConfig, resolve

from .conftest import BAD_DATA, CITY_DB, CN_MEMORIAL, ROOT

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
    assert process.stdout.readline().startswith(f"try: pdp check --target {target}")
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
        (["--snapshot", "{missing}"], {}, "No such file or directory"),
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
        (["--listen", "0.0.0.0"], {}, "--listen: '0.0.0.0' is not HOST:PORT"),  # noqa: S104  # refused, not bound
        (["--cache-size", "0"], {}, "--cache-size: 0 is not a positive integer"),
        ([], {"PDP_WORKERS": "many"}, "environment variable PDP_WORKERS: invalid literal"),
        (["--config", "{tmp}/pdp.yaml"], {}, "pdp.yaml:2: unknown setting 'colour'"),
        (["--snapshot", ""], {"PDP_SNAPSHOT_URL": ""}, "no snapshot: pass --snapshot"),
        (["--snapshot", "https://store.invalid/rules.yaml"], {}, "only file:// snapshot sources"),
    ],
)
def test_serve_refuses_bad_start_up_input(
    tmp_path: Path, rules_file: Path, extra: list[str], env: dict[str, str], expected: str
) -> None:
    bad_rules = tmp_path / "rules.yaml"
    bad_rules.write_text("version: 1\nrules:\n  - id: x\n    jurisdiction: [XX]\n    effect: deny\n")
    (tmp_path / "pdp.yaml").write_text("listen: unix:/tmp/x.sock\ncolour: blue\n")
    base = ["--listen", f"unix:{tmp_path}/s.sock", "--snapshot", str(rules_file), "--geoip-db", str(CITY_DB)]
    substitutions = {"bad_rules": str(bad_rules), "missing": str(tmp_path / "missing.yaml"), "tmp": str(tmp_path)}
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
    assert json.loads(as_json.stdout) == [{"ip": "2001:2e0::1", "found": True, "country": "HK", "subdivisions": []}]

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
