"""Memory at scale (issue #12, item 13): a bounded rule count, and a chart sized from it.

The chart's figures come from ``benchmarks/rules_memory.py`` (helm/pdp/README.md, "Sizing
memory"); these tests pin what is rendered from them and the refusal beyond the bound.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from pdp.config import resolve
from pdp.geo import GeoDatabase
from pdp.reload import Reloader
from pdp.rules import MAX_RULES
from pdp.sources import open_source
from pdp.state import PolicyHolder

from .conftest import CITY_DB, ROOT
from .test_helm import render, with_values

PDP = [sys.executable, "-m", "pdp"]
CHART_SCHEMA = ROOT / "helm" / "pdp" / "values.schema.json"


def snapshot(version: int, count: int) -> bytes:
    rule = '{"id":"r%d","effect":"deny","jurisdiction":["CN"],"legal_basis":"Order 17/2020"}'
    return (f'{{"version":{version},"rules":[' + ",".join(rule % n for n in range(count)) + "]}").encode()


def test_a_snapshot_over_the_rule_bound_is_refused_naming_it(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(snapshot(1, MAX_RULES + 1))
    result = subprocess.run([*PDP, "snapshot", "validate", str(big)], capture_output=True, text=True, check=False)
    assert result.returncode == 1, result.stderr
    assert f"rules: {MAX_RULES + 1:,} rules, more than the {MAX_RULES:,} a snapshot may hold" in result.stderr


def test_a_running_sidecar_refuses_too_many_rules_and_keeps_serving(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_bytes(snapshot(1, 3))
    holder = PolicyHolder()
    holder.activate_geo(GeoDatabase(CITY_DB))
    reloader = Reloader(holder, open_source(rules.as_uri()))
    assert reloader.run_once() == "activated version 1"
    staged = tmp_path / "staged.json"
    staged.write_bytes(snapshot(2, MAX_RULES + 1))
    staged.replace(rules)
    result = reloader.run_once()
    assert result.startswith("rejected: ")
    assert f"more than the {MAX_RULES:,}" in result
    assert holder.active is not None
    assert (holder.active.policy.version, len(holder.active.policy.rules)) == (1, 3)
    assert holder.active.geo.locate("175.16.199.1").country == "CN"


def memory_mib(rules: int, cache: int, geoip_mib: int) -> int:
    """The chart's documented formula (values.yaml, helm/pdp/README.md)."""
    return 48 + math.ceil(30 * rules / 10_000) + math.ceil(53 * cache / 100_000) + 2 * geoip_mib


def pdp_resources(values: dict[str, Any]) -> dict[str, Any]:
    (daemonset,) = [d for d in render({**values, "mode": "daemonset"}) if d["kind"] == "DaemonSet"]
    (container,) = [c for c in daemonset["spec"]["template"]["spec"]["containers"] if c["name"] == "pdp"]
    return dict(container["resources"])


@pytest.mark.parametrize(
    ("changes", "rules", "cache", "geoip"),
    [
        ({}, 10_000, 100_000, 64),
        ({"sizing__rules": 300_000}, 300_000, 100_000, 64),
        ({"sizing__rules": 1, "cacheSize": 1000, "sizing__geoipMiB": 10}, 1, 1000, 10),
        ({"sizing__rules": 55_555, "cacheSize": 250_001, "sizing__geoipMiB": 130}, 55_555, 250_001, 130),
    ],
)
def test_the_memory_limit_follows_rules_cache_and_database(
    changes: dict[str, Any], rules: int, cache: int, geoip: int
) -> None:
    resources = pdp_resources(with_values(**changes))
    expected = f"{memory_mib(rules, cache, geoip)}Mi"
    assert resources["limits"] == {"memory": expected}
    assert resources["requests"] == {"cpu": "100m", "memory": expected}


def test_measured_peaks_fit_under_the_sized_limit() -> None:
    # benchmarks/rules_memory.py, GeoLite2-City of 54 MiB, 100,000 cache entries: the
    # charge estimate (peak with every rule reloaded, both database copies whole).
    measured = {1: 187.0, 10_000: 217.6, 100_000: 474.1, 300_000: 1023.5}
    for rules, charge in measured.items():
        assert charge < memory_mib(rules, 100_000, 54) * 0.96, rules  # at least 4 % to spare


def test_given_memory_is_kept_and_a_request_defaults_to_the_limit() -> None:
    resources = pdp_resources(with_values(resources={"limits": {"memory": "1Gi", "cpu": "2"}}))
    assert resources == {"limits": {"memory": "1Gi", "cpu": "2"}, "requests": {"cpu": "100m", "memory": "1Gi"}}
    both = pdp_resources(with_values(resources={"requests": {"memory": "300Mi"}, "limits": {"memory": "400Mi"}}))
    assert both == {"requests": {"cpu": "100m", "memory": "300Mi"}, "limits": {"memory": "400Mi"}}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"sizing__rules": MAX_RULES + 1}, "rules"),
        ({"sizing__rules": 0}, "rules"),
        ({"sizing__geoipMiB": 0}, "geoipMiB"),
        ({"sizing__colour": 1}, "colour"),
        ({"nat64Prefixes": ["2001:db8::/57"]}, "nat64Prefixes"),
        ({"nat64Prefixes": "2001:db8:64::/96"}, "nat64Prefixes"),
    ],
)
def test_schema_rejects_bad_sizing_and_prefixes(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(with_values(**changes))
    assert field in str(caught.value)


def test_the_schema_bound_is_pdps_bound() -> None:
    schema = json.loads(CHART_SCHEMA.read_text())
    assert schema["properties"]["sizing"]["properties"]["rules"]["maximum"] == MAX_RULES


def test_nat64_prefixes_reach_pdp_serve_as_its_setting() -> None:
    documents = render(with_values(nat64Prefixes=["2001:db8:64::/96", "2001:db8:100::/40"]))
    (config_map,) = [d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    config = resolve({}, dict(config_map["data"]))
    assert config.nat64_prefixes == ["2001:db8:64::/96", "2001:db8:100::/40"]
    assert (
        "PDP_NAT64_PREFIX"
        not in next(
            d for d in render(with_values()) if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")
        )["data"]
    )


@pytest.mark.parametrize(
    ("changes", "processes"),
    [
        ({"processes": 2}, 2),
        ({"processes": 4}, 4),
        ({"processes": "auto", "resources": {"limits": {"cpu": "1500m"}}}, 2),
        ({"processes": "auto", "resources": {"limits": {"cpu": "3"}}}, 3),
    ],
)
def test_memory_is_sized_per_worker_process(changes: dict[str, Any], processes: int) -> None:
    # Each worker holds its own policy, database copy and cache; the supervisor takes about 48 MiB.
    resources = pdp_resources(with_values(**changes))
    assert resources["limits"]["memory"] == f"{48 + processes * memory_mib(10_000, 100_000, 64)}Mi"


def test_auto_processes_without_a_cpu_limit_needs_a_given_memory_limit() -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(with_values(processes="auto", mode="daemonset"))
    assert "processes: auto needs resources.limits.cpu" in str(caught.value)
    given = pdp_resources(with_values(processes="auto", resources={"limits": {"memory": "1Gi"}}))
    assert given["limits"] == {"memory": "1Gi"}
