"""What a new user meets in the first hour, through the real `pdp` command: explain, flags, JSON, help."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import maxminddb
import pytest

from pdp.cli import build_parser
from pdp.config import SETTINGS, ConfigError, Setting, resolve

from .conftest import CITY_DB, CN_MEMORIAL, ROOT, ServerFactory

PDP = str(Path(sys.executable).parent / "pdp")  # the console script a user runs
CITY_BUILD = maxminddb.open_database(str(CITY_DB)).metadata().build_epoch


def pdp(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")} | (env or {})
    return subprocess.run([PDP, *args], capture_output=True, text=True, timeout=timeout, env=environment, check=False)


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(CN_MEMORIAL)  # cn-memorial (CN, tag memorial) and us-wa (US-WA)
    return path


# --------------------------------------------------------------------------- 4: explain refuses impossible locations


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (["--country", "China"], "--country: 'China' is not an ISO 3166-1 alpha-2 country code (like 'CN'); did you"),
        (["--country", "XX"], "--country: 'XX' is not an ISO 3166-1 alpha-2 country code"),
        (["--country", "US-WA"], "--country: 'US-WA' is a subdivision: pass --subdivision US-WA"),
        (["--country", "CN", "--subdivision", "US-WA"], "--subdivision: 'US-WA' is in US, not in CN (from --country)"),
        (["--subdivision", "WA"], "--subdivision: 'WA' needs its country, as in ISO 3166-2: like 'US-WA'"),
        (["--country", "US", "--subdivision", "WA"], "--subdivision: 'WA' needs its country"),
        (["--subdivision", "US-WS"], "--subdivision: 'US-WS' is not an ISO 3166-2 subdivision of US; did you mean"),
        (["--subdivision", "CN-TW"], "--subdivision: 'CN-TW' reaches nobody: GeoIP data locates Taiwan as the country"),
        (["--subdivision", "US-WA", "--subdivision", "CN-FJ"], "--subdivision: 'CN-FJ' is in CN, not in US"),
        (["--ip", "175.16.199.1", "--subdivision", "US-WA"], "--subdivision goes with --country, not --ip"),
    ],
)
def test_explain_refuses_impossible_locations(rules_file: Path, where: list[str], expected: str) -> None:
    result = pdp("explain", "--rules", str(rules_file), *where, "--meeting", "m-1", "--geoip-db", str(CITY_DB))
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


def test_explain_subdivision_alone_implies_its_country(rules_file: Path) -> None:
    result = pdp("explain", "--rules", str(rules_file), "--subdivision", "US-WA", "--meeting", "m-1")
    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines()[0] == "DENY  us-wa"
    assert "location     US (US-WA)" in result.stdout
    lower = pdp("explain", "--rules", str(rules_file), "--country", "cn", "--meeting", "m-1", "--tag", "memorial")
    assert lower.returncode == 3, lower.stderr
    assert "location     CN" in lower.stdout


def test_explain_without_a_database_prints_no_build(rules_file: Path) -> None:
    text = pdp("explain", "--rules", str(rules_file), "--country", "CN", "--meeting", "m-1")
    assert text.returncode == 0, text.stderr
    assert "1970" not in text.stdout
    assert "policy       version 7, no GeoIP database (location given)" in text.stdout
    document = json.loads(
        pdp("explain", "--rules", str(rules_file), "--country", "CN", "--meeting", "m", "--json").stdout
    )
    assert (document["geoip_build"], document["geoip_build_time"]) == (None, None)
    located = pdp(
        "explain", "--rules", str(rules_file), "--ip", "175.16.199.1", "--geoip-db", str(CITY_DB), "--meeting", "m"
    )
    assert f"GeoIP build {_date(CITY_BUILD)}" in located.stdout


# --------------------------------------------------------------------------- 5: flags behave like flags

SWITCHES = [setting for setting in SETTINGS if setting.switch]


def test_every_boolean_setting_is_a_switch() -> None:
    booleans = [s.name for s in SETTINGS if isinstance(getattr(resolve({}, {}), s.name), bool)]
    assert [s.name for s in SWITCHES] == booleans == ["allow_insecure_remote", "audit_include_ip"]


@pytest.mark.parametrize("setting", SWITCHES, ids=[s.name for s in SWITCHES])
def test_switches_are_bare_flags_with_no_forms(setting: Setting) -> None:
    parser = build_parser()
    on = vars(parser.parse_args(["serve", setting.flag]))
    off = vars(parser.parse_args(["serve", "--no-" + setting.flag.removeprefix("--")]))
    unset = vars(parser.parse_args(["serve"]))
    assert getattr(resolve(on, {}), setting.name) is True
    assert getattr(resolve(off, {setting.env: "true"}), setting.name) is False, "the flag beats the variable"
    assert getattr(resolve(unset, {}), setting.name) is False
    help_text = " ".join(pdp("serve", "--help").stdout.split())
    assert f"{setting.flag}, --no-{setting.flag[2:]}" in help_text


@pytest.mark.parametrize(
    ("spelling", "value"),
    [(s, True) for s in ("true", "TRUE", "True", "1", "yes", "Yes", "on", "ON")]
    + [(s, False) for s in ("false", "FALSE", "0", "no", "NO", "off", "Off")],
)
def test_boolean_variables_take_the_usual_spellings(spelling: str, value: bool) -> None:
    for setting in SWITCHES:
        assert getattr(resolve({}, {setting.env: spelling}), setting.name) is value


def test_bare_switch_and_variable_work_in_a_real_serve(tmp_path: Path, rules_file: Path) -> None:
    common = ["serve", "--snapshot", str(rules_file), "--geoip-db", str(CITY_DB), "--log-format", "text"]
    refused = pdp(*common, "--listen", "0.0.0.0:0", "--no-allow-insecure-remote")  # refused, not bound
    assert refused.returncode == 2
    assert "without TLS" in refused.stderr
    assert "--allow-insecure-remote" in refused.stderr  # the advice names the bare flag, which now works
    for extra, env in ((["--allow-insecure-remote"], {}), ([], {"PDP_ALLOW_INSECURE_REMOTE": "On"})):
        with _serving([*common, "--listen", "0.0.0.0:0", *extra], env) as banner:
            assert "listening on 0.0.0.0:" in banner


@pytest.mark.parametrize(
    ("flag", "bad", "message"),
    [
        ("--workers", "abc", "'abc' is not an integer"),
        ("--cache-size", "1.5", "'1.5' is not an integer"),
        ("--batch-limit", "0", "0 is not a positive integer"),
        ("--grace-seconds", "soon", "'soon' is not a number"),
        ("--grace-seconds", "nan", "nan is outside 0..3600 seconds"),
        ("--poll-seconds", "0.01", "0.01 is outside 0.05..86400 seconds"),
        ("--audit-allow-sample-rate", "2", "2.0 is outside 0..1"),
        ("--allow-insecure-remote", "maybe", "'maybe' is not true or false (nor 1/0, yes/no, on/off)"),
    ],
)
def test_bad_values_get_the_same_message_from_a_flag_a_variable_and_a_file(
    tmp_path: Path, flag: str, bad: str, message: str
) -> None:
    (setting,) = [s for s in SETTINGS if s.flag == flag]
    config = tmp_path / "pdp.yaml"
    config.write_text(f"{setting.name}: '{bad}'\n")
    origins = {
        "environment variable " + setting.env: ({}, {setting.env: bad}),
        f"{config}:1: {setting.name}": ({"config": str(config)}, {}),
    }
    if not setting.switch:
        origins[flag] = ({setting.name: bad}, {})
    for origin, (flags, environ) in origins.items():
        with pytest.raises(ConfigError) as refused:
            resolve(flags, environ)
        assert str(refused.value) == f"{origin}: {message}"


def test_a_bad_number_in_a_variable_names_it_in_a_real_serve(tmp_path: Path, rules_file: Path) -> None:
    common = ["serve", "--listen", f"unix:{tmp_path}/s.sock", "--snapshot", str(rules_file), "--geoip-db", str(CITY_DB)]
    from_env = pdp(*common, env={"PDP_WORKERS": "abc"})
    from_flag = pdp(*common, "--workers", "abc")
    assert (from_env.returncode, from_flag.returncode) == (2, 2)
    assert from_env.stderr.strip() == "pdp: environment variable PDP_WORKERS: 'abc' is not an integer"
    assert from_flag.stderr.strip() == "pdp: --workers: 'abc' is not an integer"


# --------------------------------------------------------------------------- 7: one build, two forms, everywhere


def test_check_and_geo_lookup_json_give_the_build_as_epoch_and_rfc3339(start: ServerFactory) -> None:
    server, _, _ = start()
    check = pdp("check", "--target", server.address, "--ip", "175.16.199.1", "--meeting", "m", "--json")
    assert check.returncode == 0, check.stderr
    document = json.loads(check.stdout)
    assert document["geoip_build"] == CITY_BUILD
    assert document["geoip_build_time"] == _rfc3339(CITY_BUILD)
    text = pdp("check", "--target", server.address, "--ip", "175.16.199.1", "--meeting", "m")
    assert f"GeoIP build {_date(CITY_BUILD)}" in text.stdout
    (row,) = json.loads(pdp("geo", "lookup", "175.16.199.1", "--geoip-db", str(CITY_DB), "--json").stdout)
    assert (row["geoip_build"], row["geoip_build_time"]) == (CITY_BUILD, _rfc3339(CITY_BUILD))
    lookup = pdp("geo", "lookup", "175.16.199.1", "--geoip-db", str(CITY_DB))
    assert f"built {_date(CITY_BUILD)}" in lookup.stdout


def test_status_gives_the_build_as_epoch_and_rfc3339_and_a_date_in_text(start: ServerFactory) -> None:
    server, _, _ = start()
    document = json.loads(pdp("status", "--target", server.address, "--json").stdout)
    assert document["geoip_build"] == CITY_BUILD
    assert document["geoip_build_time"] == _rfc3339(CITY_BUILD)
    text = pdp("status", "--target", server.address)
    assert text.returncode == 0, text.stderr
    assert re.search(rf"^geoip_build +{_date(CITY_BUILD)}$", text.stdout, re.MULTILINE), text.stdout
    assert str(CITY_BUILD) not in text.stdout


def test_status_exits_2_on_a_server_that_is_not_serving_and_help_says_so(start: ServerFactory) -> None:
    server, _, _ = start(loaded=False)
    waiting = pdp("status", "--target", server.address, "--json")
    assert waiting.returncode == 2
    assert json.loads(waiting.stdout)["serving"] is False
    assert f"pdp: {server.address} is not serving (exit 2)" in waiting.stderr
    help_text = " ".join(pdp("status", "--help").stdout.split())
    assert "exit 2 when it is not serving" in help_text


def test_readme_command_table_lists_every_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("| command | what it does |", 1)[1].split("\n\n", 1)[0]
    (subcommands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name in subcommands.choices:
        assert f"| `pdp {name}" in table, name


# --------------------------------------------------------------------------- helpers


def _date(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d")


def _rfc3339(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Serving:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")} | env
        self.process = subprocess.Popen(
            [PDP, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
        )

    def __enter__(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline()  # blocks until it listens (or has died)

    def __exit__(self, *_: object) -> None:
        self.process.terminate()
        self.process.communicate(timeout=30)


def _serving(args: list[str], env: dict[str, str]) -> _Serving:
    return _Serving(args, env)
