"""ISO 3166-1 alpha-2 country codes that a rule's jurisdiction may name."""

from __future__ import annotations

import re

# Officially assigned codes (tzdata's iso3166.tab), plus XK: Kosovo has no ISO
# code, but MaxMind's databases locate addresses in XK, so rules must name it.
COUNTRIES: frozenset[str] = frozenset(
    # A table reads better than 250 quoted strings.
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM
    BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX
    CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG
    GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR
    IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV
    LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE
    NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO
    RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF
    TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF
    WS YE YT ZA ZM ZW XK
    """.split()  # noqa: SIM905
)

# ISO 3166-2: the country code, a hyphen, then one to three letters or digits.
_SUBDIVISION = re.compile(r"[A-Z]{2}-[A-Z0-9]{1,3}")


def jurisdiction_problem(code: str) -> str | None:
    """Return why ``code`` is not a jurisdiction code, or None if it is one."""
    if code.upper() != code and (code.upper() in COUNTRIES or _SUBDIVISION.fullmatch(code.upper())):
        return f"{code!r} must be upper case: {code.upper()!r}"
    if "-" in code:
        if not _SUBDIVISION.fullmatch(code):
            return f"{code!r} is not an ISO 3166-2 subdivision code (like 'US-CA')"
        if code[:2] not in COUNTRIES:
            return f"{code!r} names no ISO 3166-1 country ({code[:2]!r})"
        return None
    if code not in COUNTRIES:
        return f"{code!r} is not an ISO 3166-1 alpha-2 country code (like 'CN')"
    return None
