"""The AuthZEN Access Evaluation and Access Evaluations APIs over the one decision path.

HTTP-free: each method takes a request body and returns ``(status, body)``;
:mod:`pdp.authzen.server` carries them. Decisions, telemetry and audit are
:class:`~pdp.decisions.DecisionPath`'s, exactly as for gRPC ``Check``: this
module maps requests (:mod:`pdp.authzen.mapping`) and answers
(:mod:`pdp.authzen.answer`), and the path's two errors to 503 and 400.

A batch is decided at one policy version: through ``check_batch`` (one call,
observed once) when every item is one participant of the same meeting and
action under ``execute_all``, else item by item, in order, with the state
read once and passed to every ``check``. The short-circuit semantics stop
after the first false (``deny_on_first_deny``) or true
(``permit_on_first_permit``) answer and answer the items up to it
(Authorization API 1.0, section 7.1.2.1); items after it are never decided,
so never observed or audited.
"""

from __future__ import annotations

import time

from pdp.authzen.answer import Answers, allowed, error_body, evaluations_body, failed_item
from pdp.authzen.mapping import (
    BadRequestError,
    Evaluation,
    Evaluations,
    parse_body,
    parse_evaluation,
    parse_evaluations,
)
from pdp.decisions import DecisionPath, Endpoint, NotReadyError, RequestError
from pdp.state import Active

__all__ = ["EVALUATION", "EVALUATIONS", "AuthZen", "Reply"]

EVALUATION = Endpoint("http", "authzen", "evaluation", label="authzen/evaluation")
EVALUATIONS = Endpoint("http", "authzen", "evaluations", label="authzen/evaluations")

Reply = tuple[int, bytes]  # HTTP status, JSON body


def _bad(error: BadRequestError) -> Reply:
    return 400, error_body(400, str(error), error.field)


def _unavailable(error: NotReadyError) -> Reply:
    return 503, error_body(503, str(error))


class AuthZen:
    """Answers AuthZEN requests from ``path``; at most ``batch_limit`` evaluations per batch."""

    def __init__(self, path: DecisionPath, batch_limit: int) -> None:
        self._path = path
        self._batch_limit = batch_limit
        self._answers = Answers()

    def evaluation(self, body: bytes) -> Reply:
        """``POST /access/v1/evaluation`` (section 6)."""
        started = time.perf_counter()
        try:
            return self._one(parse_evaluation(parse_body(body)), EVALUATION)
        except BadRequestError as error:
            self._path.refused(EVALUATION, started)
            return _bad(error)

    def evaluations(self, body: bytes) -> Reply:
        """``POST /access/v1/evaluations`` (section 7); without items, one evaluation (section 7.1)."""
        started = time.perf_counter()
        try:
            request = parse_body(body)
            batch = parse_evaluations(request, self._batch_limit)
            if batch is None:
                return self._one(parse_evaluation(request), EVALUATIONS)
        except BadRequestError as error:
            self._path.refused(EVALUATIONS, started)
            return _bad(error)
        active = self._path.holder.active
        if active is None:
            return _unavailable(NotReadyError())
        items = self._shared_meeting(batch)
        if items is None:
            items = self._item_by_item(batch, active)
        return 200, evaluations_body(items)

    def _one(self, evaluation: Evaluation, endpoint: Endpoint) -> Reply:
        try:
            return 200, self._path.check(
                evaluation.ip, evaluation.user_id, evaluation.account_id, evaluation.resource, evaluation.action,
                endpoint=endpoint, present=self._answers,
            )  # fmt: skip
        except NotReadyError as error:
            return _unavailable(error)
        except RequestError as error:
            return _bad(evaluation.field(error))

    def _shared_meeting(self, batch: Evaluations) -> list[bytes] | None:
        """The answers through ``check_batch``, or None when the batch is not
        one meeting and action under ``execute_all``, or an item is refused
        (then each item is decided on its own, to say which)."""
        items = batch.items
        first = items[0]
        if batch.semantic != "execute_all" or not isinstance(first, Evaluation):
            return None
        key, action = first.resource.key, first.action
        participants: list[Evaluation] = []
        for item in items:
            if not isinstance(item, Evaluation) or item.action != action or item.resource.key != key:
                return None
            participants.append(item)
        try:
            decided = self._path.check_batch(
                participants, first.resource, action,
                limit=self._batch_limit, endpoint=EVALUATIONS, present=self._answers,
                observe_refusal=False,  # the items are decided and observed one by one next
            )  # fmt: skip
        except (RequestError, NotReadyError):
            return None
        return decided.results

    def _item_by_item(self, batch: Evaluations, active: Active) -> list[bytes]:
        answers: list[bytes] = []
        stop_on = {"deny_on_first_deny": False, "permit_on_first_permit": True}.get(batch.semantic)
        for item in batch.items:
            answer = self._item(item, active)
            answers.append(answer)
            if stop_on is not None and allowed(answer) == stop_on:
                break
        return answers

    def _item(self, item: Evaluation | BadRequestError, active: Active) -> bytes:
        if isinstance(item, BadRequestError):
            return failed_item(400, str(item), item.field)
        try:
            return self._path.check(
                item.ip, item.user_id, item.account_id, item.resource, item.action,
                endpoint=EVALUATIONS, present=self._answers, active=active,
            )  # fmt: skip
        except RequestError as error:
            refused = item.field(error)
            return failed_item(400, str(refused), refused.field)
