"""The peer: nginx with the geoip2 module doing the same country-level deny, driven by wrk.

nginx reads the participant's address from a header, looks it up in the same
GeoLite2-City file with ``geoip2``, and ``map`` turns CN into 403, anything
else into 200: one decision per HTTP request. One worker process, pinned to the
server core; wrk on the client core. Debian packages: nginx-light,
libnginx-mod-http-geoip2, wrk.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import CLIENT_CORE, SERVER_CORE, pinned
from pdp.geo import demo_database_path

MODULE = Path("/usr/lib/nginx/modules/ngx_http_geoip2_module.so")

CONFIG = """\
load_module {module};
worker_processes 1;
worker_cpu_affinity {affinity};
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {folder}/body;
  proxy_temp_path {folder}/proxy;
  fastcgi_temp_path {folder}/fastcgi;
  uwsgi_temp_path {folder}/uwsgi;
  scgi_temp_path {folder}/scgi;
  geoip2 {database} {{
    $participant_country source=$http_x_participant_ip country iso_code;
  }}
  map $participant_country $denied {{
    CN 1;
    default 0;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      if ($denied) {{ return 403 "DENY\\n"; }}
      return 200 "ALLOW\\n";
    }}
  }}
}}
"""

WRK_SCRIPT = """\
local addresses = {{}}
for line in io.lines("{addresses}") do addresses[#addresses + 1] = line end
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/", {{["X-Participant-IP"] = addresses[(n % #addresses) + 1]}})
end
"""


def available() -> str | None:
    """None when the peer can run, else what to install."""
    missing = [name for name in ("nginx", "wrk") if shutil.which(name) is None]
    if not MODULE.exists():
        missing.append("libnginx-mod-http-geoip2")
    return (
        f"apt-get install -y nginx-light libnginx-mod-http-geoip2 wrk (missing: {', '.join(missing)})"
        if missing
        else None
    )


def _cpu_seconds(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0]) if children else master


def measure(addresses: Path, seconds: float, connections: int = 16, port: int = 18080) -> dict[str, Any]:
    """Decisions per second and per CPU-second of the nginx worker, closed loop."""
    folder = Path(tempfile.mkdtemp(prefix="pdp-nginx-"))
    affinity = "1" + "0" * SERVER_CORE
    config = folder / "nginx.conf"
    config.write_text(
        CONFIG.format(module=MODULE, affinity=affinity, folder=folder, database=demo_database_path(), port=port)
    )
    script = folder / "addresses.lua"
    script.write_text(WRK_SCRIPT.format(addresses=addresses))
    nginx = subprocess.Popen(["nginx", "-c", str(config), "-p", str(folder)], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(200):  # until nginx answers; it prints nothing when ready
            probe = subprocess.run(["wrk", "-t1", "-c1", "-d1s", url], capture_output=True, text=True, check=False)
            if "Requests/sec" in probe.stdout:
                break
        worker = _worker_pid(nginx.pid)
        before = _cpu_seconds(worker)
        run = subprocess.run(
            pinned(CLIENT_CORE, ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script), url]),
            capture_output=True,
            text=True,
            check=True,
        )
        cpu = _cpu_seconds(worker) - before
    finally:
        nginx.terminate()
        nginx.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", run.stdout)[1])  # type: ignore[index]
    requests = int(re.search(r"(\d+) requests in", run.stdout)[1])  # type: ignore[index]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", run.stdout)
    return {
        "decisions_per_s": round(rate),
        "decisions_per_cpu_s": round(requests / cpu) if cpu else None,
        "server_cpu_s": round(cpu, 2),
        "denied": int(errors[1]) if errors else 0,
        "requests": requests,
        "connections": connections,
    }
