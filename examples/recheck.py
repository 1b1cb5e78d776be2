"""Re-check live participants whenever the sidecar activates a new policy.

Run it from the repository, with the virtualenv's Python (``make run`` in
another terminal starts a sidecar on 127.0.0.1:50051):

    .venv/bin/python examples/recheck.py --meetings examples/meetings.json
    .venv/bin/python examples/recheck.py --meetings examples/meetings.json --once
    .venv/bin/python examples/recheck.py --target unix:/run/pdp/pdp.sock --meetings meetings.json

meetings.json describes what a meeting node has admitted:

    {"m-1": {"tags": ["memorial"], "host": "acme-corp",
             "participants": [{"ip": "1.0.1.1", "user": "u-1"}, {"ip": "8.8.8.8", "user": "u-2"}]}}

On every WatchPolicy event (the first arrives at once) each meeting is re-checked
with one CheckBatch; participants now denied are printed with the rule, reason
and legal basis (a real node would remove them). The stream is reopened if the
sidecar restarts. ``--once`` stops after the first event's re-check (to try it,
or from a script); otherwise it runs until Ctrl-C, which ends it quietly.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from pdp.client import Client, Participant


def recheck(client: Client, meetings: dict[str, Any]) -> None:
    for meeting_id, meeting in meetings.items():
        people = [Participant(person["ip"], person.get("user", "")) for person in meeting["participants"]]
        results = client.check_batch(
            meeting_id, people, tags=meeting.get("tags", []), host_account_id=meeting.get("host", "")
        )
        for person, result in zip(people, results, strict=True):
            if not result.allowed:
                print(
                    f"  remove {person.user_id or person.ip} from {meeting_id}: {result.rule_id} - {result.reason} "
                    f"({result.legal_basis}; located in {result.location.country})",
                    flush=True,
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051", help="sidecar address (default 127.0.0.1:50051)")
    parser.add_argument("--meetings", type=Path, required=True, help="JSON file of live meetings")
    parser.add_argument("--once", action="store_true", help="stop after the first event (for trying it)")
    options = parser.parse_args()
    meetings = json.loads(options.meetings.read_text())
    # Ctrl-C only sets a flag: a KeyboardInterrupt raised wherever the main thread is
    # (inside grpc's own waits and locks) can leave the channel unable to close. The
    # stream is followed on a thread of its own; this one waits, then closes the channel.
    interrupted: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))  # takes no lock
    result: list[int] = []
    with Client(options.target, timeout=5) as client:
        follower = threading.Thread(
            target=lambda: result.append(follow(client, meetings, once=options.once, stopping=interrupted)),
            name="recheck-follower",
            daemon=True,
        )
        follower.start()
        while follower.is_alive() and not interrupted:
            time.sleep(0.1)  # how soon Ctrl-C is noticed; not synchronisation
    follower.join(timeout=10)  # closing the channel cancelled its stream
    return 130 if interrupted else (result[0] if result else 1)


def follow(client: Client, meetings: dict[str, Any], *, once: bool, stopping: list[int]) -> int:
    while not stopping:
        try:
            for event in client.watch_policy():
                print(f"policy version {event.policy_version} active: re-checking {len(meetings)} meetings", flush=True)
                recheck(client, meetings)
                if once:
                    return 0
        except grpc.RpcError as error:
            if stopping:
                break  # the channel was closed on Ctrl-C
            code = error.code().name if isinstance(error, grpc.Call) else error
            print(f"sidecar unavailable ({code}); retrying", flush=True)
            time.sleep(1)  # reconnect pacing for a human-facing example, not synchronisation
    return 130


if __name__ == "__main__":
    sys.exit(main())
