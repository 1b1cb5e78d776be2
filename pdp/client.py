"""A small typed client for meeting nodes.

One channel per client, reused for every call; each call carries a deadline.
Errors are the gRPC ones: :class:`grpc.RpcError` with ``code()`` and
``details()`` (UNAVAILABLE when the sidecar is down or not ready,
INVALID_ARGUMENT naming the bad field, DEADLINE_EXCEEDED).

>>> with Client("unix:/run/pdp/pdp.sock") as pdp:       # doctest: +SKIP
...     result = pdp.check("175.16.199.1", "m-1", tags=["memorial"])
...     result.allowed
False
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from pdp._proto import admission_pb2 as pb
from pdp._proto import admission_pb2_grpc as pb_grpc
from pdp.model import Action, Location, Verdict

__all__ = ["CheckResult", "Client", "Participant", "PolicyEvent"]


@dataclass(frozen=True, slots=True)
class Participant:
    """One participant of a CheckBatch."""

    ip: str
    user_id: str = ""
    account_id: str = ""


@dataclass(frozen=True, slots=True)
class PolicyEvent:
    """A policy (or GeoIP database) activation on the sidecar."""

    policy_version: int
    geoip_build: int
    activated_at: float  # Unix seconds


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The sidecar's answer for one participant."""

    verdict: Verdict
    rule_id: str
    reason: str
    legal_basis: str
    location: Location
    policy_version: int
    geoip_build: int
    shadow_rule_ids: tuple[str, ...]

    @property
    def allowed(self) -> bool:
        return self.verdict == Verdict.ALLOW

    @classmethod
    def from_message(cls, message: pb.CheckResponse) -> CheckResult:
        return cls(
            verdict=Verdict(message.verdict),
            rule_id=message.rule_id,
            reason=message.reason,
            legal_basis=message.legal_basis,
            location=Location(message.location.country, tuple(message.location.subdivisions)),
            policy_version=message.policy_version,
            geoip_build=message.geoip_build,
            shadow_rule_ids=tuple(message.shadow_rule_ids),
        )


# gRPC Python shares one connection among the channels to one target unless each has a
# subchannel pool of its own: without this, every Client of a process reached the one worker
# of `pdp serve --processes N` that connection was hashed to.
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


class Client:
    """Client for one sidecar at ``target`` (``127.0.0.1:50051`` or ``unix:/path``).

    ``timeout`` is the default deadline of each call, in seconds.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 1.0,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        server_name: str | None = None,
    ) -> None:
        """With ``tls_ca``, the channel uses TLS and trusts that CA; add
        ``tls_cert`` and ``tls_key`` for a sidecar that requires client
        certificates. ``server_name`` overrides the name checked in the
        server's certificate."""
        self.target = target
        self.timeout = timeout
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes(),
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
            )
            options = [*_OWN_CONNECTION, *([("grpc.ssl_target_name_override", server_name)] if server_name else [])]
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=_OWN_CONNECTION)
        self._stub = pb_grpc.AdmissionServiceStub(self._channel)

    def check(
        self,
        ip: str,
        meeting_id: str,
        *,
        tags: Iterable[str] = (),
        host_account_id: str = "",
        action: Action = Action.JOIN,
        user_id: str = "",
        account_id: str = "",
        timeout: float | None = None,
    ) -> CheckResult:
        """Decide for one participant.

        :raises grpc.RpcError: on any non-OK status.
        """
        request = pb.CheckRequest(
            participant=pb.Participant(ip=ip, user_id=user_id, account_id=account_id),
            meeting=pb.Meeting(meeting_id=meeting_id, host_account_id=host_account_id, tags=list(tags)),
            action=int(action),  # type: ignore[arg-type]  # Action values equal the proto's
        )
        response = self._stub.Check(request, timeout=self.timeout if timeout is None else timeout)
        return CheckResult.from_message(response)

    def check_batch(
        self,
        meeting_id: str,
        participants: Sequence[Participant | str],
        *,
        tags: Iterable[str] = (),
        host_account_id: str = "",
        action: Action = Action.JOIN,
        timeout: float | None = None,
    ) -> list[CheckResult]:
        """Decide for many participants of one meeting; results in the same order.

        :raises grpc.RpcError: on any non-OK status.
        """
        people = [p if isinstance(p, Participant) else Participant(p) for p in participants]
        request = pb.CheckBatchRequest(
            meeting=pb.Meeting(meeting_id=meeting_id, host_account_id=host_account_id, tags=list(tags)),
            participants=[pb.Participant(ip=p.ip, user_id=p.user_id, account_id=p.account_id) for p in people],
            action=int(action),  # type: ignore[arg-type]
        )
        response = self._stub.CheckBatch(request, timeout=self.timeout if timeout is None else timeout)
        return [CheckResult.from_message(result) for result in response.results]

    def watch_policy(self, *, timeout: float | None = None) -> Generator[PolicyEvent, None, None]:
        """Yield the active versions at once, then after every activation.

        Re-check live participants with :meth:`check_batch` on each event. The
        stream ends when ``timeout`` (default: none) expires or the server stops;
        call again to resubscribe; ``close()`` ends it at once.

        :raises grpc.RpcError: on any non-OK status other than the deadline.
        """
        stream = self._stub.WatchPolicy(pb.WatchPolicyRequest(), timeout=timeout)
        try:
            for event in stream:
                yield PolicyEvent(event.policy_version, event.geoip_build, event.activated_at.ToMicroseconds() / 1e6)
        except grpc.RpcError as error:
            if isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return
            raise
        finally:
            stream.cancel()

    def status(self, *, timeout: float | None = None) -> pb.GetStatusResponse:
        """The sidecar's status message.

        :raises grpc.RpcError: on any non-OK status.
        """
        response: pb.GetStatusResponse = self._stub.GetStatus(
            pb.GetStatusRequest(), timeout=self.timeout if timeout is None else timeout
        )
        return response

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
