"""Keep the files that xds-protos shares with other packages those packages' own.

    python scripts/proto_overlap.py           # repair: reinstall the overwritten packages (make does this)
    python scripts/proto_overlap.py --check   # exit 1 and list them when any is overwritten

xds-protos (Envoy's API stubs, which pdp serves) also ships its own copies of
``google/api``, ``google/rpc``, ``google/type`` ... (grpc/grpc#42830) and of
``opentelemetry/proto`` (grpc/grpc#42926), and pip lets whichever package is
installed last own the file. Its ``opentelemetry/proto`` predates
``InstrumentationScope``: installed after opentelemetry-proto, it breaks the
OTLP exporter at import. The fix is to let the other package win, since
pdp only needs ``google/rpc/status.proto`` from that set, identical in both
(tests/test_protos.py imports everything together and checks).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
from importlib import metadata
from pathlib import Path

XDS = "xds-protos"


def _record(distribution: metadata.Distribution) -> dict[str, str]:
    """Installed file (relative path) -> its sha256 as RECORD writes it."""
    files = {}
    for file in distribution.files or ():
        if file.hash is not None and file.hash.mode == "sha256" and file.suffix in (".py", ".pyi"):
            files[str(file)] = file.hash.value
    return files


def _digest(path: Path) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()


def overwritten() -> dict[str, list[str]]:
    """Distributions (name==version) whose files shared with xds-protos hold other bytes than theirs."""
    xds = metadata.distribution(XDS)
    shared = set(_record(xds))
    found: dict[str, list[str]] = {}
    for distribution in metadata.distributions():
        name = distribution.metadata["Name"]
        if name is None or name.lower() == XDS:
            continue
        for relative, digest in _record(distribution).items():
            if relative not in shared or relative.endswith("__init__.py"):
                continue
            path = Path(str(distribution.locate_file(relative)))
            if not path.is_file() or _digest(path) != digest:
                found.setdefault(f"{name}=={distribution.version}", []).append(relative)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report; exit 1 when a file is overwritten")
    options = parser.parse_args()
    found = overwritten()
    for requirement, files in sorted(found.items()):
        print(f"{requirement}: {len(files)} files overwritten by {XDS}, e.g. {files[0]}", file=sys.stderr)
    if options.check or not found:
        return 1 if found else 0
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", *sorted(found)]
    subprocess.run(command, check=True)
    left = overwritten()
    if left:
        print(f"still overwritten: {sorted(left)}", file=sys.stderr)
        return 1
    print(f"restored {', '.join(sorted(found))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
