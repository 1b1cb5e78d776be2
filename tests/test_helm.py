"""The Helm chart, rendered by the real Helm engine and checked against Kubernetes' schemas."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from pdp.cli import build_parser
from pdp.config import SETTINGS, resolve
from pdp.envoy.mapping import parse_source

from .conftest import ROOT

CHART = ROOT / "helm" / "pdp"
KUBERNETES = "1.35.0"  # pinned: the schemas bundled with kubernetes-validate for this release
SCENARIOS = sorted(path.name.removesuffix("-values.yaml") for path in (CHART / "ci").glob("*-values.yaml"))
POD_IP = "10.1.2.3"

MEETING_NODE_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-meeting-node
spec:
  selector:
    matchLabels: {app: meeting-node}
  template:
    metadata:
      labels: {app: meeting-node}
    spec:
      containers:
        - name: meeting-node
          image: example/meeting-node:1.0
          volumeMounts:
            - name: pdp-socket
              mountPath: /run/pdp
        {{- include "pdp.sidecarContainer" .Subcharts.pdp | nindent 8 }}
      {{- with include "pdp.sidecarInitContainers" .Subcharts.pdp }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      volumes:
        {{- include "pdp.sidecarVolumes" .Subcharts.pdp | nindent 8 }}
"""


def scenario_values(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())
    return values


@pytest.fixture(scope="module")
def meeting_node_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A meeting-node chart that depends on pdp and includes its named templates, as the README shows."""
    root = tmp_path_factory.mktemp("meeting-node")
    (root / "templates").mkdir()
    shutil.copytree(CHART, root / "charts" / "pdp")
    (root / "Chart.yaml").write_text(
        "apiVersion: v2\nname: meeting-node\nversion: 1.0.0\ndependencies:\n  - name: pdp\n    version: 0.1.0\n"
    )
    (root / "templates" / "deployment.yaml").write_text(MEETING_NODE_DEPLOYMENT)
    return root


def render(values: dict[str, Any], chart: Path = CHART) -> list[dict[str, Any]]:
    manifests = helm.Chart.load(chart).render(values, name="meet", namespace="meet")
    documents: list[dict[str, Any]] = []
    for name, text in sorted(manifests.items()):
        if name.endswith("NOTES.txt"):
            continue
        documents.extend(document for document in yaml.safe_load_all(text) if document)
    return documents


def render_scenario(name: str, meeting_node_chart: Path) -> list[dict[str, Any]]:
    values = scenario_values(name)
    if values.get("mode", "sidecar") == "sidecar":
        return render({"pdp": values}, meeting_node_chart)
    return render(values)


def pod_specs(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc["spec"]["template"]["spec"] for doc in documents if doc["kind"] in ("Deployment", "DaemonSet")]


def pdp_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    (spec,) = pod_specs(documents)
    (container,) = [c for c in spec["containers"] if c["name"] == "pdp"]
    return dict(container)


# --------------------------------------------------------------------------- every scenario


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_renders_lints_and_validates(scenario: str, meeting_node_chart: Path) -> None:
    documents = render_scenario(scenario, meeting_node_chart)
    assert pod_specs(documents), "every scenario ends in a pod running pdp"
    for document in documents:
        if document["kind"] == "ServiceMonitor":
            continue  # a CRD: not in Kubernetes' own schemas
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
    values = scenario_values(scenario)
    report = helm.lint(CHART, values, strict=False, kube_version=f"v{KUBERNETES}")
    errors = [m for m in report["messages"] if m["severity"] >= 3] + report["errors"]
    assert errors == []


def test_there_are_five_scenarios() -> None:
    assert SCENARIOS == ["daemonset", "example", "otlp", "redis-signing", "sidecar"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_container_is_hardened_and_probed_over_grpc(scenario: str, meeting_node_chart: Path) -> None:
    documents = render_scenario(scenario, meeting_node_chart)
    container = pdp_container(documents)
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 8081
    assert container["readinessProbe"]["grpc"]["service"] == "pdp.v1.AdmissionService"
    assert "--health-listen" in container["args"]
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert mounts["pdp-state"]["mountPath"] == "/var/lib/pdp/state"
    assert mounts["pdp-geoip"]["readOnly"] is True


@pytest.mark.parametrize("scenario", ["example", "sidecar"])
def test_socket_is_shared_through_an_emptydir(scenario: str, meeting_node_chart: Path) -> None:
    (spec,) = pod_specs(render_scenario(scenario, meeting_node_chart))
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert "emptyDir" in volumes["pdp-socket"]
    mounting = [
        container["name"]
        for container in spec["containers"]
        if any(mount["name"] == "pdp-socket" for mount in container.get("volumeMounts", []))
    ]
    assert sorted(mounting) == ["meeting-node", "pdp"]
    assert pdp_container(render_scenario(scenario, meeting_node_chart))["args"][2] == "unix:/run/pdp/sock/pdp.sock"


def test_daemonset_mode_is_node_local() -> None:
    documents = render(scenario_values("daemonset"))
    kinds = {document["kind"]: document for document in documents}
    assert kinds["Service"]["spec"]["internalTrafficPolicy"] == "Local"
    assert kinds["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    container = pdp_container(documents)
    assert container["args"][2] == "$(POD_IP):50051"  # the pod IP, never 0.0.0.0


def test_geoipupdate_downloads_before_pdp_starts() -> None:
    (spec,) = pod_specs(render(scenario_values("example")))
    assert [c["name"] for c in spec["initContainers"]] == ["geoipupdate-init"]
    assert "geoipupdate" in [c["name"] for c in spec["containers"]]


# --------------------------------------------------------------------------- chart and CLI agree


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_args_and_env_are_parsed_by_pdp_serve(scenario: str, meeting_node_chart: Path) -> None:
    documents = render_scenario(scenario, meeting_node_chart)
    container = pdp_container(documents)
    (config_map,) = [d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    environment = dict(config_map["data"])
    environment.update({item["name"]: item["value"] for item in container.get("env", []) if "value" in item})
    known = {setting.env for setting in SETTINGS}
    unknown = sorted(name for name in environment if name.startswith("PDP_") and name not in known)
    assert unknown == [], "the chart sets variables pdp does not read"
    args = [arg.replace("$(POD_IP)", POD_IP) for arg in container["args"]]
    options = build_parser().parse_args(args)
    assert options.command == "serve"
    config = resolve(vars(options), environment)
    assert config.health_listen == f"{POD_IP}:8081"
    assert config.snapshot == environment["PDP_SNAPSHOT_URL"]
    assert config.geoip_db.startswith("/var/lib/pdp/geoip/")
    assert config.state_dir == "/var/lib/pdp/state/snapshot"  # pdp creates it 0700 in the emptyDir
    values = scenario_values(scenario)
    if values.get("snapshot", {}).get("signing", {}).get("enabled"):
        assert config.pubkey_files == ["/etc/pdp/keys/ops-2026.pub", "/etc/pdp/keys/ops-2027.pub"]
    if values.get("mode") == "daemonset":
        tls = values.get("tls", {})
        assert config.allow_insecure_remote == (not tls.get("existingSecret"))
        if tls.get("existingSecret"):
            assert (config.tls_cert, config.tls_key) == ("/etc/pdp/tls/tls.crt", "/etc/pdp/tls/tls.key")
            assert config.tls_client_ca == ("/etc/pdp/tls/ca.crt" if tls.get("requireClientCert") else "")
    pinned = values.get("geoip", {}).get("sha256File")
    assert config.geoip_sha256_file == (f"/var/lib/pdp/geoip/{pinned}" if pinned else "")
    if values.get("audit", {}).get("log"):
        assert (config.audit_log, config.audit_hmac_key_file) == ("stdout", "/etc/pdp/audit/hmac-key")
    chart_defaults = yaml.safe_load((CHART / "values.yaml").read_text())["extAuthz"]
    ext_authz = {**chart_defaults, **values.get("extAuthz", {})}
    assert config.ext_authz_sources == {
        name: parse_source(ext_authz[key]) if ext_authz[key] else ""
        for name, key in (("meeting_id", "meetingId"), ("tags", "tags"), ("host_account_id", "hostAccountId"),
                          ("action", "action"), ("user_id", "userId"), ("account_id", "accountId"))
    }  # fmt: skip
    assert config.ext_authz_required.split(",") == ext_authz["required"]
    assert config.ext_authz_trusted_headers == ",".join(ext_authz["trustedHeaders"]).lower()
    assert config.ext_authz_xff_trusted_hops == ext_authz["xffTrustedHops"]
    assert config.ext_authz_jwt_payload_key == ext_authz["jwtPayloadKey"]
    if values.get("authzen", {}).get("enabled"):
        daemonset = values.get("mode") == "daemonset"
        assert config.http_listen == (f"{POD_IP}:8080" if daemonset else "unix:/run/pdp/authzen.sock")
    else:
        assert config.http_listen == ""


# --------------------------------------------------------------------------- bad values


VALID = {"snapshot": {"url": "https://store.example.com/rules"}, "geoip": {"existingClaim": "geo"}}


def with_values(**changes: Any) -> dict[str, Any]:
    values = yaml.safe_load(yaml.safe_dump(VALID))
    for dotted, value in changes.items():
        target = values
        *parents, leaf = dotted.split("__")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return dict(values)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"mode": "cluster"}, "mode"),
        ({"healthPort": 0}, "healthPort"),
        ({"securityContext__runAsNonRoot": False}, "runAsNonRoot"),
        ({"securityContext__readOnlyRootFilesystem": False}, "readOnlyRootFilesystem"),
        ({"geoip__source": "s3"}, "source"),
        ({"snapshot__url": "ftp://store/rules"}, "url"),
        ({"snapshot__candidateUrl": "s3://store/next"}, "candidateUrl"),
        ({"logLevel": "verbose"}, "logLevel"),
        ({"workers": 1}, "workers"),
        ({"processes": 0}, "processes"),
        ({"processes": "all"}, "processes"),
        ({"colour": "blue"}, "colour"),
        ({"geoip__file": "GeoLite2-City.tar.gz"}, "file"),
        ({"geoip__sha256File": "../etc/digest"}, "sha256File"),
        ({"extAuthz__meetingId": "query:room"}, "meetingId"),
        ({"extAuthz__meetingId": ""}, "meetingId"),
        ({"extAuthz__xffTrustedHops": -1}, "xffTrustedHops"),
        ({"extAuthz__required": ["room"]}, "required"),
        ({"extAuthz__trustedHeaders": ["x meeting"]}, "trustedHeaders"),
        ({"authzen__port": 70000}, "port"),
        ({"authzen__socketName": "../pdp.sock"}, "socketName"),
        ({"authzen__enabled": "yes"}, "enabled"),
    ],
)
def test_schema_rejects_bad_values(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(with_values(**changes))
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"snapshot__url": ""}, "set snapshot.url (file://, http(s):// or redis://) or snapshot.inlineRules"),
        ({"snapshot__inlineRules": {"version": 1, "rules": []}}, "set snapshot.url or snapshot.inlineRules, not both"),
        ({"snapshot__signing": {"enabled": True}}, "snapshot.signing.enabled needs snapshot.signing.existingSecret"),
        (
            {"snapshot__signing": {"enabled": True, "existingSecret": "keys"}},
            "needs snapshot.signing.keyNames",
        ),
        ({"geoip__existingClaim": ""}, "geoip.source=existingClaim needs geoip.existingClaim"),
        ({"geoip__source": "geoipupdate"}, "geoip.source=geoipupdate needs geoip.geoipupdate.accountId"),
        ({"telemetry__serviceMonitor": {"enabled": True}}, "needs telemetry.metricsExporter=prometheus"),
        ({"audit__log": "stdout"}, "audit.log needs audit.hmacKeySecret"),
        (
            {"authzen": {"enabled": True, "socketName": "pdp.sock"}},
            "authzen.socketName must differ from listen.socketName",
        ),
        ({"tls__requireClientCert": True}, "tls.requireClientCert needs tls.existingSecret"),
        ({"telemetry__metricsExporter": "otlp"}, "telemetry.metricsExporter=otlp needs telemetry.otlpEndpoint"),
        (
            {"telemetry__metricsExporter": "prometheus", "processes": 2},
            "telemetry.metricsExporter=prometheus needs one process",
        ),
        (
            {"telemetry__metricsExporter": "prometheus", "processes": "auto", "resources__limits": {"cpu": "2"}},
            "telemetry.metricsExporter=prometheus needs one process",
        ),
        (
            {"geoip__source": "geoipupdate", "geoip__sha256File": "City.mmdb.sha256"},
            "geoip.sha256File cannot be used with geoip.source=geoipupdate",
        ),
        (
            {"extAuthz__tags": "header:X-Meeting-Tags", "extAuthz__trustedHeaders": ["x-other"]},
            "extAuthz.tags reads header:X-Meeting-Tags, which a client may write",
        ),
    ],
)
def test_inconsistent_values_fail_with_what_to_set(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(with_values(**changes))
    assert message in str(caught.value)


def test_inline_public_keys_become_a_secret() -> None:
    pem = textwrap.dedent("""\
        -----BEGIN PUBLIC KEY-----
        MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=
        -----END PUBLIC KEY-----
        """)
    documents = render(with_values(mode="example", snapshot__signing={"enabled": True, "publicKeys": {"a.pub": pem}}))
    (secret,) = [d for d in documents if d["kind"] == "Secret"]
    assert secret["stringData"]["a.pub"].strip() == pem.strip()


# --------------------------------------------------------------------------- the image


def test_dockerfile_entrypoint_and_copies_exist() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["pdp"]' in dockerfile
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'pdp = "pdp.cli:main"' in pyproject
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    assert "USER 10001:10001" in dockerfile
    assert ".mmdb" not in dockerfile.replace("No GeoIP database inside", "")


def test_every_value_is_commented_and_in_the_chart_readme() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("chart_values_table", ROOT / "scripts" / "chart_values_table.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (CHART / "values.yaml").read_text()
    assert module.table(text) in (CHART / "README.md").read_text()
    documented = {path.split(".")[0] for path, _, _ in module.documented_values(text)}
    assert set(yaml.safe_load(text)) == documented, "every top-level key needs a `# --` comment on it or a child"


@pytest.mark.parametrize(("processes", "expected"), [(1, 1), (2, 2), ("auto", None)])
def test_processes_reach_pdp_serve_as_its_setting(processes: int | str, expected: int | None) -> None:
    from pdp.cpus import usable_cpus

    resources = {"limits": {"cpu": "2"}}
    documents = render(with_values(processes=processes, resources=resources))
    (config_map,) = [d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    assert config_map["data"]["PDP_PROCESSES"] == str(processes)
    config = resolve({}, dict(config_map["data"]))
    assert config.processes == (expected if expected is not None else usable_cpus())


def test_a_candidate_snapshot_reaches_pdp_serve_as_its_setting() -> None:
    candidate = "https://store.example.com/rules-next"
    for values, expected in ((with_values(snapshot__candidateUrl=candidate), candidate), (with_values(), "")):
        documents = render(values)
        (config_map,) = [d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
        assert config_map["data"].get("PDP_CANDIDATE_SNAPSHOT", "") == expected
        assert resolve({}, dict(config_map["data"])).candidate_snapshot == expected


def test_prometheus_renders_with_one_process_however_it_is_asked_for() -> None:
    """processes: auto on a one-core limit is one process (pdp rounds the quota up): allowed."""
    for processes, limits in ((1, {}), ("auto", {"cpu": "1", "memory": "512Mi"}), ("auto", {"cpu": "500m"})):
        changes: dict[str, Any] = {"telemetry__metricsExporter": "prometheus", "processes": processes}
        if limits:
            changes["resources__limits"] = limits
        documents = render(with_values(**changes))
        environment = [
            variable
            for document in documents
            if document["kind"] == "ConfigMap"
            for variable in document.get("data", {}).items()
        ]
        assert ("OTEL_METRICS_EXPORTER", "prometheus") in environment, processes
