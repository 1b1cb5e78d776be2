"""The common base of every error pdp reports to a user instead of crashing.

``pdp.cli.main`` turns a :class:`PdpError` into ``pdp: <message>`` and exit 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["PdpError"]


class PdpError(Exception):
    """A problem with pdp's input, configuration or environment, said in one message."""
