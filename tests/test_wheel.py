"""The image's install, without an image engine: build the wheel from what the Dockerfile copies,
install it into a fresh venv the way the runtime stage does, and serve a decision from it.

A file missing from the wheel (package data, a generated stub) fails here, not in a pod.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from .conftest import CITY_DB, ROOT
from .servers import free_port

WHEELHOUSE = ROOT / ".venv" / "wheelhouse"  # runtime dependencies as wheels, written by `make .venv/.installed`
# What the image installs: pdp and the exporters the chart's telemetry values name (helm/pdp, telemetry.*).
IMAGE_INSTALL = "pdp[otlp,prometheus]"
# Reinstalled after it, as xds-protos overwrites their files (scripts/proto_overlap.py).
OVERWRITTEN = ["opentelemetry-proto", "googleapis-common-protos"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _copied_by_the_dockerfile() -> list[str]:
    """The build stage's COPY sources (the build context the wheel is made from)."""
    build_stage = DOCKERFILE.split("FROM ", 2)[1]
    sources: list[str] = []
    for line in build_stage.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources.extend(line.split()[1:-1])
    return sources


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with pdp installed from its wheel only, as in the image; returns its bin/."""
    if not any(WHEELHOUSE.glob("grpcio-*.whl")):
        message = f"no dependency wheels in {WHEELHOUSE}: run `make .venv/.installed` (it writes them)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("image")
    context = root / "src"
    context.mkdir()
    for name in _copied_by_the_dockerfile():
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, context / name)
    wheels = root / "wheels"
    # The build stage: a wheel of pdp (its dependencies come from the wheelhouse instead of the index).
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), "."],
         cwd=context)  # fmt: skip
    venv = root / "opt-pdp"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=root)
    # The runtime stage's install, word for word, plus the wheelhouse for the dependencies.
    _run([str(venv / "bin" / "pip"), "install", "--no-cache-dir", "--no-index", f"--find-links={wheels}",
          f"--find-links={WHEELHOUSE}", IMAGE_INSTALL], cwd=root)  # fmt: skip
    _run([str(venv / "bin" / "pip"), "install", "--no-cache-dir", "--no-index", f"--find-links={WHEELHOUSE}",
          "--force-reinstall", "--no-deps", *OVERWRITTEN], cwd=root)  # fmt: skip
    return venv / "bin"


def _environment(bin_dir: Path) -> dict[str, str]:
    """The image's environment: no PYTHONPATH, nothing of the checkout on the path."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PDP_", "PYTHON", "VIRTUAL_ENV"))}
    return keep | {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


def test_the_dockerfile_copies_what_the_wheel_is_built_from() -> None:
    assert _copied_by_the_dockerfile() == ["pyproject.toml", "README.md", "LICENSE", "NOTICE", "pdp"]
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    assert allowed == set(_copied_by_the_dockerfile()), ".dockerignore lets exactly the copied files through"
    runtime = DOCKERFILE.split("FROM ", 2)[2]
    assert f"pip install --no-cache-dir --no-index --find-links=/wheels '{IMAGE_INSTALL}'" in runtime
    assert "--force-reinstall --no-deps \\\n    " + " ".join(OVERWRITTEN) in runtime


def test_no_file_of_the_image_is_overwritten_by_another_package(installed: Path, tmp_path: Path) -> None:
    """What `make` repairs in .venv, the image must not ship broken."""
    check = [str(installed / "python"), str(ROOT / "scripts" / "proto_overlap.py"), "--check"]
    result = subprocess.run(check, cwd=tmp_path, env=_environment(installed), capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_the_wheel_holds_the_package_data_and_the_license(installed: Path) -> None:
    (wheel,) = (installed.parent.parent / "wheels").glob("pdp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("pdp/iso3166.json", "pdp/py.typed", "pdp/_proto/admission_pb2.pyi", "pdp/sources/__init__.py"):
        assert expected in names
    assert any(re.fullmatch(r"pdp-[^/]+\.dist-info/licenses/LICENSE", name) for name in names), names
    assert any(re.fullmatch(r"pdp-[^/]+\.dist-info/licenses/NOTICE", name) for name in names), names


def test_pdp_serves_a_decision_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    env = _environment(installed)
    where = _run([str(installed / "python"), "-c", "import pdp; print(pdp.__file__)"], cwd=tmp_path, env=env)
    assert where.stdout.startswith(str(installed.parent)), "pdp is imported from the fresh venv, not the checkout"
    rules = tmp_path / "rules.yaml"
    shutil.copy(ROOT / "examples" / "rules.yaml", rules)
    target = f"unix:{tmp_path}/pdp.sock"
    server = subprocess.Popen(
        [str(installed / "pdp"), "serve", "--listen", target, "--snapshot", str(rules), "--geoip-db", str(CITY_DB),
         "--log-format", "text"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()  # blocks until it listens (or has died)
        assert f"listening on {target}: policy version" in banner, banner + (
            server.stderr.read() if server.stderr else ""
        )
        check = subprocess.run(
            [str(installed / "pdp"), "check", "--target", target, "--ip", "175.16.199.1", "--meeting", "m-1",
             "--tag", "memorial"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert check.returncode == 3, check.stdout + check.stderr
        assert check.stdout.splitlines()[0] == "DENY  cn-order-2020-17"
    finally:
        server.terminate()
        server.communicate(timeout=30)
    assert server.returncode == 0


@pytest.mark.parametrize("exporter", ["prometheus", "otlp"])
def test_the_image_exports_the_metrics_the_chart_can_ask_for(installed: Path, tmp_path: Path, exporter: str) -> None:
    """The chart's telemetry.metricsExporter sets OTEL_METRICS_EXPORTER; each value it
    allows must start the installed image, and Prometheus must be scraped from it."""
    port = free_port()
    env = _environment(installed) | {
        "OTEL_METRICS_EXPORTER": exporter,
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(port),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nothing listens: exports fail, quietly
    }
    target = f"unix:{tmp_path}/pdp.sock"
    server = subprocess.Popen(
        [str(installed / "pdp"), "serve", "--listen", target, "--snapshot", str(ROOT / "examples" / "rules.yaml"),
         "--geoip-db", str(CITY_DB), "--log-format", "text"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert f"listening on {target}" in banner, banner + (server.stderr.read() if server.stderr else "")
        if exporter == "prometheus":
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                assert "pdp_policy_version" in answer.read().decode()
    finally:
        server.terminate()
        server.communicate(timeout=30)
    assert server.returncode == 0


def test_the_installed_wheel_validates_jurisdictions_from_its_own_table(installed: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nrules:\n  - {id: a, effect: allow, jurisdiction: [US-WS]}\n")
    result = subprocess.run(
        [str(installed / "pdp"), "snapshot", "validate", str(rules)],
        cwd=tmp_path, env=_environment(installed), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "did you mean 'US-WA' (Washington)?" in result.stderr


# --------------------------------------------------------------------------- make image


def _make_image(tmp_path: Path, tools: list[str], **variables: str) -> subprocess.CompletedProcess[str]:
    """`make image` with only ``tools`` (and sed) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ["sed", *tools]:
        found = shutil.which(tool)
        assert found, f"{tool} is not installed"
        (bin_dir / tool).symlink_to(found)
    make = shutil.which("make")
    assert make, "make is not installed (Debian: apt-get install make)"
    args = [make, "--no-print-directory", "-C", str(ROOT), "image", *(f"{k}={v}" for k, v in variables.items())]
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_make_image_says_clearly_when_no_builder_is_installed(tmp_path: Path) -> None:
    result = _make_image(tmp_path, [])
    assert result.returncode == 2
    assert "make image: no OCI image builder on PATH: install docker, podman or buildah" in result.stderr


def test_make_image_says_when_docker_has_no_daemon(tmp_path: Path) -> None:
    docker = shutil.which("docker") is not None  # a client without a daemon, as on this project's machine
    result = _make_image(tmp_path, ["docker"] if docker else [])
    assert result.returncode == 2
    expected = "docker is installed but its daemon does not answer" if docker else "no OCI image builder on PATH"
    assert expected in result.stderr


def test_make_image_runs_the_chosen_builder_on_the_dockerfile(tmp_path: Path) -> None:
    """No engine runs here: a stand-in builder records how `make image` calls it."""
    recorder = tmp_path / "podman"
    recorder.write_text(f'#!/bin/sh\necho "$PWD $*" > {tmp_path}/called\n')
    recorder.chmod(0o755)
    result = _make_image(tmp_path, [], OCI_BUILDER=str(recorder), IMAGE="registry.example/pdp:1.2.3")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "called").read_text().split() == [
        str(ROOT),
        "build",
        "--tag",
        "registry.example/pdp:1.2.3",
        "--file",
        "Dockerfile",
        ".",
    ]
    assert "set the chart's image.repository and image.tag" in result.stdout


def test_chart_readme_says_to_build_and_push_the_image_first_and_which_value_to_set() -> None:
    readme = (ROOT / "helm" / "pdp" / "README.md").read_text()
    first = readme.split("\n## ", 2)[1]  # the first section after the introduction
    assert first.startswith("First: build and push the image")
    for needed in ("make image IMAGE=", "push", "`image.repository`", "--set image.repository="):
        assert needed in first, needed
