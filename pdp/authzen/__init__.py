"""The OpenID AuthZEN Authorization API 1.0 over HTTP (``--http-listen``).

``mapping`` turns request bodies into the decision path's values, ``answer``
encodes Decision objects and errors, ``service`` runs the Access Evaluation
and Access Evaluations APIs over :class:`pdp.decisions.DecisionPath`, and
``server`` carries them over HTTP.
"""

from pdp.authzen.server import MAX_BODY_BYTES, RunningHttp, start_http

__all__ = ["MAX_BODY_BYTES", "RunningHttp", "start_http"]
