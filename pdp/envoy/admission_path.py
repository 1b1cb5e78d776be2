"""Interim: Envoy's Check decided on ``AdmissionService``'s own Check path.

Until the protocol-agnostic decision path (``pdp/decisions.py``) lands, this
adapter turns an :class:`~pdp.envoy.mapping.HttpAdmission` into a
``pdp.v1.CheckRequest`` and runs it through ``AdmissionServicer``'s observed
Check, so validation, telemetry and audit stay in one place. Its aborts come
back as :class:`NotReady` and :class:`RequestError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from pdp._proto import admission_pb2 as pb
from pdp.model import Decision, Location

if TYPE_CHECKING:
    from pdp.envoy.mapping import HttpAdmission
    from pdp.policy import Active
    from pdp.server import AdmissionServicer

__all__ = ["Decide", "NotReady", "RequestError", "admission_path"]

Decide = Callable[["HttpAdmission"], tuple[Decision, Location, "Active"]]


class NotReady(Exception):  # noqa: N818  # the name the decision path will give it
    """No policy and GeoIP database are active yet."""


class RequestError(Exception):
    """The request is invalid; ``field`` names what, as ``pdp.v1`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class _Capture:
    """The slice of a ServicerContext that the Check path uses: abort, as an exception."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        if code == grpc.StatusCode.UNAVAILABLE:
            raise NotReady(details)
        field, _, message = details.partition(": ")
        raise RequestError(field, message) if message else RequestError("request", details)


def admission_path(servicer: AdmissionServicer) -> Decide:
    """The decision path of ``servicer``'s Check, for one HTTP admission.

    The returned function raises :class:`NotReady` and :class:`RequestError`.
    """
    capture: Any = _Capture()
    check = servicer.observed_check

    def decide(admission: HttpAdmission) -> tuple[Decision, Location, Active]:
        request = pb.CheckRequest(
            participant=pb.Participant(ip=admission.ip, user_id=admission.user_id, account_id=admission.account_id),
            meeting=pb.Meeting(
                meeting_id=admission.meeting_id, host_account_id=admission.host_account_id, tags=admission.tags
            ),
            action=int(admission.action),  # type: ignore[arg-type]  # IntFlag values equal the proto's
        )
        _, decision, location, active = check(request, capture)
        return decision, location, active

    return decide
