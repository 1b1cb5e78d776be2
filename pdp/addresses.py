"""Participant addresses: strict validation, and the IPv4 address inside an IPv6 one.

Behind NAT64 or SIIT (RFC 6052, RFC 7915), 6to4 (RFC 3056) or Teredo (RFC 4380)
an IPv4 participant reaches an IPv6-only node with an IPv6 address that carries
its IPv4 address. GeoIP databases locate such an address nowhere (NAT64, SIIT),
or at the relay (Teredo: MaxMind's IPv6 databases map 2001::/32 to the Teredo
*server's* address, so a participant in mainland China using a server in the US
is located in the US). Either way a country rule would not reach the participant.
So pdp locates the embedded IPv4 address instead, and says which it located.

Well-known forms, always on:

- ``::ffff:a.b.c.d`` IPv4-mapped, and ``::ffff:0:a.b.c.d`` SIIT (IPv4-translated);
- ``64:ff9b::/96``, the NAT64 well-known prefix (RFC 6052);
- ``64:ff9b:1::/48``, the NAT64 local-use block (RFC 8215), read as /96 prefixes
  inside it (the IPv4 address in the last 32 bits, as ``64:ff9b:1::/96`` puts it);
  an operator using a shorter RFC 6052 layout there names it with ``--nat64-prefix``;
- ``2002::/16`` 6to4: the site's IPv4 address in bits 16-47 (the same address
  MaxMind's IPv6 databases already map it to);
- ``2001::/32`` Teredo: the *client's* public IPv4 address, the last 32 bits
  inverted (RFC 4380 5.1), not the Teredo server in bits 32-63.

Operators add their own NAT64 prefixes (``--nat64-prefix 2001:db8:64::/96``);
those are matched first, most specific first.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from pdp.errors import PdpError

__all__ = [
    "WELL_KNOWN",
    "Embedding",
    "Forms",
    "InvalidAddressError",
    "InvalidPrefixError",
    "embedded_ipv4",
    "embeddings",
    "parse_address",
    "parse_nat64_prefix",
]

NAT64_LENGTHS = (32, 40, 48, 56, 64, 96)
"""The prefix lengths RFC 6052 (2.2) defines an address layout for."""

_ALL32 = 0xFFFFFFFF
# IPv4-compatible, -mapped and -translated addresses: never an operator's NAT64 prefix.
_RESERVED = tuple(ipaddress.IPv6Network(prefix) for prefix in ("::/96", "::ffff:0:0/96", "::ffff:0:0:0/96"))


class InvalidAddressError(PdpError, ValueError):
    """An address is not a plain IPv4 or IPv6 address. ``position`` is its index
    in a batch (see :meth:`pdp.geo.GeoDatabase.locate_many`)."""

    position: int = 0


class InvalidPrefixError(PdpError, ValueError):
    """A NAT64 prefix is malformed, of a length RFC 6052 does not define, or reserved."""


def parse_address(text: str) -> None:
    """Check that ``text`` is one plain IPv4 or IPv6 address.

    inet_pton is strict where the MaxMind extension is not (it would read "1.2.3"
    as 1.2.0.3 and drop a zone index), and costs a tenth of ipaddress'.

    :raises InvalidAddressError: with a message saying what is wrong.
    """
    try:
        socket.inet_pton(socket.AF_INET, text)
        return
    except (OSError, ValueError):
        pass
    try:
        socket.inet_pton(socket.AF_INET6, text)
        return
    except (OSError, ValueError):
        pass
    if not text:
        raise InvalidAddressError("required")
    if "%" in text:
        raise InvalidAddressError(f"{text[:64]!r}: zone indexes are not accepted, send the address alone")
    if text.count(":") == 1 or text.startswith("["):
        raise InvalidAddressError(f"{text[:64]!r}: send the address alone, without a port or brackets")
    raise InvalidAddressError(f"{text[:64]!r} is not an IPv4 or IPv6 address")


@dataclass(frozen=True, slots=True)
class Embedding:
    """One IPv6 prefix whose addresses carry an IPv4 address, and where."""

    network: ipaddress.IPv6Network
    name: str  # what an operator reads in `pdp explain`: "NAT64 well-known prefix 64:ff9b::/96, RFC 6052"
    extract: Callable[[int], int]  # the 128-bit address to the 32-bit IPv4 address
    # Matching is a shift and a compare, done on a cache miss only.
    _shift: int = field(init=False, repr=False, compare=False)
    _prefix: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_shift", 128 - self.network.prefixlen)
        object.__setattr__(self, "_prefix", int(self.network.network_address) >> self._shift)

    def matches(self, value: int) -> bool:
        return value >> self._shift == self._prefix


def _rfc6052(length: int) -> Callable[[int], int]:
    """The IPv4 address of an RFC 6052 address with a prefix of ``length`` bits:
    the bits after the prefix up to bit 63, then from bit 72 on (bits 64-71, the
    "u" octet, are skipped; they are not checked, since the layout alone says
    where the address is)."""
    if length == 96:
        return lambda value: value & _ALL32
    high_bits = 64 - length
    low_bits = 32 - high_bits
    low_shift = 128 - 72 - low_bits

    def extract(value: int) -> int:
        high = (value >> 64) & ((1 << high_bits) - 1)
        return (high << low_bits) | ((value >> low_shift) & ((1 << low_bits) - 1))

    return extract


def _known(prefix: str, name: str, extract: Callable[[int], int]) -> Embedding:
    return Embedding(ipaddress.IPv6Network(prefix), name, extract)


WELL_KNOWN: tuple[Embedding, ...] = (
    _known("::ffff:0:0/96", "IPv4-mapped ::ffff:0:0/96", _rfc6052(96)),
    _known("::ffff:0:0:0/96", "SIIT IPv4-translated ::ffff:0:0:0/96, RFC 7915", _rfc6052(96)),
    _known("64:ff9b::/96", "NAT64 well-known prefix 64:ff9b::/96, RFC 6052", _rfc6052(96)),
    _known("64:ff9b:1::/48", "NAT64 local-use prefix 64:ff9b:1::/48, RFC 8215, read as /96", _rfc6052(96)),
    _known("2002::/16", "6to4 2002::/16, RFC 3056", lambda value: (value >> 80) & _ALL32),
    _known("2001::/32", "Teredo 2001::/32, RFC 4380: the client's address", lambda value: ~value & _ALL32),
)


def parse_nat64_prefix(text: str) -> Embedding:
    """An operator's NAT64 prefix, like ``2001:db8:64::/96``.

    :raises InvalidPrefixError: not an IPv6 prefix, host bits set, a length RFC 6052 does
        not define, or overlapping where IPv6 databases keep IPv4 addresses (``::/96``,
        ``::ffff:0:0/96``, ``::ffff:0:0:0/96``).
    """
    try:
        network = ipaddress.IPv6Network(text.strip(), strict=True)
    except ipaddress.AddressValueError:
        raise InvalidPrefixError(f"{text[:64]!r} is not an IPv6 prefix like 2001:db8:64::/96") from None
    except ValueError as error:
        if "has host bits set" in str(error):
            loose = ipaddress.IPv6Network(text.strip(), strict=False)
            raise InvalidPrefixError(f"{text[:64]!r} has host bits set; the prefix is {loose}") from None
        raise InvalidPrefixError(f"{text[:64]!r} is not an IPv6 prefix like 2001:db8:64::/96 ({error})") from None
    if network.prefixlen not in NAT64_LENGTHS:
        lengths = ", ".join(f"/{length}" for length in NAT64_LENGTHS[:-1]) + f" or /{NAT64_LENGTHS[-1]}"
        raise InvalidPrefixError(f"{text[:64]!r}: a NAT64 prefix is {lengths} bits long (RFC 6052)")
    for reserved in _RESERVED:
        if network.overlaps(reserved):
            raise InvalidPrefixError(f"{text[:64]!r} overlaps {reserved}, where IPv6 databases keep IPv4 addresses")
    return Embedding(network, f"NAT64 prefix {network} from --nat64-prefix", _rfc6052(network.prefixlen))


Forms = Mapping[int, tuple[Embedding, ...]]
"""Embeddings by the first 16 bits of their prefix (every prefix is /16 or longer), so
that an ordinary IPv6 address is told apart with one dictionary lookup."""


def embeddings(prefixes: Iterable[str]) -> Forms:
    """The operator's NAT64 prefixes, most specific first, then the well-known forms.

    :raises InvalidPrefixError: as :func:`parse_nat64_prefix`.
    """
    operators = {parsed.network: parsed for parsed in map(parse_nat64_prefix, prefixes)}
    ordered = sorted(operators.values(), key=lambda embedding: -embedding.network.prefixlen)
    table: dict[int, list[Embedding]] = {}
    for form in (*ordered, *WELL_KNOWN):
        table.setdefault(int(form.network.network_address) >> 112, []).append(form)
    return {top: tuple(forms) for top, forms in table.items()}


_WELL_KNOWN_FORMS = embeddings(())


def embedded_ipv4(address: str, forms: Forms = _WELL_KNOWN_FORMS) -> tuple[str, Embedding] | None:
    """The IPv4 address that a valid IPv6 ``address`` carries, as text, and the
    form it was found in; None for an IPv4 address or an IPv6 one carrying none."""
    if ":" not in address:
        return None
    value = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
    for form in forms.get(value >> 112, ()):
        if form.matches(value):
            return socket.inet_ntoa(form.extract(value).to_bytes(4, "big")), form
    return None
