"""`pdp serve`: parse the settings, start the :class:`pdp.app.Sidecar`, print where it
listens (in a form that runs when pasted), wait for a signal.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pdp import __version__
from pdp.config import describe, resolve

if TYPE_CHECKING:
    from pdp.app import Sidecar


from pdp.commands.common import (
    EXIT_OK,
    log,
)
from pdp.geo import format_build


def cmd_serve(options: argparse.Namespace) -> int:
    from pdp import logs
    from pdp.app import Sidecar

    config = resolve(vars(options))
    logs.setup(config.log_format, config.log_level)
    log.info("starting pdp %s with %s", __version__, json.dumps(describe(config)))
    if config.processes > 1:
        from pdp.supervisor import supervise

        code = supervise(config, _serving_lines, ready=lambda lines: print("\n".join(lines), flush=True))
        log.info("shutdown complete")
        return code
    sidecar = Sidecar(config)
    sidecar.start()
    for exporter in sidecar.exporters:
        log.info("telemetry %s", exporter)
    sidecar.run_until_signal(ready=lambda: print("\n".join(_serving_lines(sidecar)), flush=True))
    log.info("shutdown complete")
    return EXIT_OK


def _serving_lines(sidecar: Sidecar) -> list[str]:
    """What `pdp serve` prints once it listens: the first line says whether it
    serves; only a serving sidecar suggests a check, in a form that runs when pasted.
    With --http-listen, the last line is where AuthZEN listens."""
    authzen = [f"AuthZEN listening on {sidecar.http.url}"] if sidecar.http is not None else []
    policy, geo, status = sidecar.holder.policy, sidecar.geo, sidecar.holder.status
    assert geo is not None  # started
    database = f"{geo.database_type} built {format_build(geo.build_epoch)}"
    if policy is None:
        return [
            f"pdp {__version__} NOT SERVING on {sidecar.address}: no policy: {status.last_error or 'none fetched yet'}",
            f"  it retries every {sidecar.config.poll_seconds:g} s and serves once {status.source} holds a valid "
            f"snapshot; until then Check answers UNAVAILABLE and health NOT_SERVING ({database})",
            *authzen,
        ]
    stale = " (stale: the store is unreachable or its snapshot was refused)" if status.stale else ""
    candidate = sidecar.candidate.holder.policy if sidecar.candidate is not None else None
    shadow = f", candidate version {candidate.version} in shadow" if candidate is not None else ""
    return [
        f"pdp {__version__} listening on {sidecar.address}: policy version {policy.version} "
        f"({len(policy.rules)} rules){stale}{shadow}, {database}",
        f"try: {pdp_command()} check --target {shlex.quote(sidecar.address)} --ip 175.16.199.1 --meeting m-1 "
        "--tag memorial",
        *authzen,
    ]


def pdp_command() -> str:
    """This pdp as a shell command that runs when pasted: ``pdp`` when that name
    on PATH is this very program, else its absolute path (``.venv/bin/pdp``
    is not on a new user's PATH), or ``python -m pdp`` when started that way."""
    started_as = sys.argv[0]
    if Path(started_as).name == "__main__.py":
        return f"{shlex.quote(sys.executable)} -m pdp"
    path = Path((shutil.which(started_as) if os.sep not in started_as else None) or started_as).absolute()
    on_path = shutil.which("pdp")
    if on_path is not None and path.exists() and path.samefile(on_path):
        return "pdp"
    return shlex.quote(str(path))
