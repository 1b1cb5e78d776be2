"""Envoy's external authorization API (``envoy.service.auth.v3.Authorization``), served by pdp.

``mapping``: HTTP request to participant, meeting and action; ``answer``: CheckResponse
bytes; ``servicer``: the gRPC method, on pdp's own decision path. Nothing is imported
here, so that ``pdp.config`` can validate mapping settings without Envoy's stubs.
"""
