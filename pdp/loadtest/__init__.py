"""Load generation against a running pdp: ``pdp loadtest`` and the benchmark suite.

Needs the ``loadtest`` extra (``pip install 'pdp[loadtest]'``: hpack and hdrhistogram).
"""

from __future__ import annotations

MISSING_EXTRA = "pdp loadtest needs the loadtest extra: pip install 'pdp[loadtest]' (hpack, hdrhistogram)"
