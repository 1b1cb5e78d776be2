"""Send a day's worth of plausible joins and hosts to a sidecar, for trying the audit log,
``pdp report`` and ``pdp snapshot impact`` (README, "Changing a policy safely").

    python examples/traffic.py --target 127.0.0.1:50051 [--meetings 40] [--seed 1]

Participants come from a handful of places the demo GeoIP database (GeoLite2-City
2018) locates: mainland China, Hong Kong, Washington State, California, England,
Russia, Berlin and private addresses; meetings are tagged ``memorial``,
``town-hall`` or nothing, some hosted by ``acme-corp``. Every call is a real Check
or CheckBatch.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdp.client import Client, Participant  # after the path fix above
from pdp.model import Action

PLACES = {
    "CN": ["1.0.1.1", "1.0.1.2", "1.2.4.8"],
    "HK": ["202.45.84.58", "202.45.84.59"],
    "US-WA": ["13.77.160.1", "52.183.0.1"],
    "US-CA": ["64.233.160.1"],
    "GB-ENG": ["81.2.69.142"],
    "RU": ["5.255.255.5", "77.88.8.8"],
    "DE-BE": ["85.214.132.117"],
    "private": ["10.0.0.7"],
}
WEIGHTS = {"CN": 6, "HK": 3, "US-WA": 3, "US-CA": 4, "GB-ENG": 3, "RU": 2, "DE-BE": 3, "private": 1}
TAGS = (["memorial"], ["town-hall"], [], ["memorial", "public"])
HOSTS = ("acme-corp", "host-17", "host-23", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="sidecar address (default 127.0.0.1:50051)")
    parser.add_argument("--meetings", type=int, default=40, help="meetings to fill (default 40)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    options = parser.parse_args(argv)
    rng = random.Random(options.seed)  # noqa: S311  # reproducible traffic, not secrets
    places = list(WEIGHTS)
    decisions = 0
    with Client(options.target, timeout=5) as client:
        for number in range(options.meetings):
            meeting, tags, host = f"m-{number:03d}", rng.choice(TAGS), rng.choice(HOSTS)
            size = rng.randint(3, 12)
            people = [
                Participant(rng.choice(PLACES[place]), f"user-{rng.randrange(300)}", f"acct-{rng.randrange(300)}")
                for place in rng.choices(places, [WEIGHTS[p] for p in places], k=size)
            ]
            client.check_batch(meeting, people, tags=tags, host_account_id=host)
            host_ip = people[0].ip
            client.check(host_ip, meeting, tags=tags, host_account_id=host, action=Action.HOST, account_id=host)
            decisions += size + 1
    print(f"{decisions} decisions in {options.meetings} meetings sent to {options.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
