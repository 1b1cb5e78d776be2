"""Render an Envoy config from envoy.template.yaml.

    python examples/envoy/render.py > examples/envoy/envoy.yaml      # the committed example
    python examples/envoy/render.py listen_port=8443 pdp_socket=/run/pdp/pdp.sock

tests/test_envoy.py and benchmarks/envoy_peer.py render the same template with
their own ports and paths; a test keeps envoy.yaml equal to this script's output.
"""

from __future__ import annotations

import string
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().with_name("envoy.template.yaml")

# The committed example. The JWKS is a throwaway demo key: put your issuer's keys here,
# or replace local_jwks with remote_jwks.
EXAMPLE = {
    "admin_port": "9901",
    "listen_address": "0.0.0.0",  # noqa: S104  # the ingress listener faces the clients
    "listen_port": "8080",
    "upstream_port": "7880",
    "pdp_socket": "/run/pdp/pdp.sock",
    "authz_timeout": "0.25s",
    "jwt_issuer": "https://meet.example.com",
    "jwt_audience": "meet-signalling",
    "jwks": '{"keys":[{"kty":"OKP","crv":"Ed25519","alg":"EdDSA","use":"sig","kid":"meet-example",'
    '"x":"T0yRsFyc_JoEN5IWHcl5nOwczc1ZOaELOlI8f0wWe0s"}]}',
}


def render(**values: str) -> str:
    """The template with EXAMPLE's values, overridden by ``values``; KeyError names a missing one."""
    return string.Template(TEMPLATE.read_text()).substitute({**EXAMPLE, **values})


if __name__ == "__main__":
    overrides = dict(argument.split("=", 1) for argument in sys.argv[1:])
    sys.stdout.write(render(**overrides))
