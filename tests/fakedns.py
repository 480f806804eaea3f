"""An in-process resolver for unit tests that reads the same zone text NSD serves.

:class:`ZoneResolver` has the contract of :class:`authmilter.resolver.Resolver` (``.query``,
``.txt``, ``.dkimpy_dnsfunc``, the same exceptions) but answers from zone text parsed with
dnspython's zone parser, so a unit test and an end-to-end test can share the zone that
:func:`dnsserver.make_zone` builds::

    zone = make_zone("example.test", [("sel._domainkey", "TXT", txt_rdata(record))])
    resolver = ZoneResolver(zone, "example.test")      # unit test
    server = nsd_server({"example.test": zone})          # end-to-end test, same text

What it answers, as an authoritative server plus a stub resolver would:

===========================================================  ================================
situation                                                    result
===========================================================  ================================
records of the type at the name (CNAMEs followed in-zone)    list of rdata
name exists, no records of the type; empty non-terminal      ``[]`` (NODATA, RFC 8020)
name does not exist and no wildcard covers it                :class:`DNSNameNotFound`
name covered by ``*.closest-encloser`` (RFC 4592)            the wildcard's records
name outside every zone (NSD answers REFUSED)                :class:`DNSTempError`
failure marker at the name (below)                           :class:`DNSTempError` /
                                                             :class:`DNSPermError`
===========================================================  ================================

**Failure markers.** A TXT record at a name whose whole text is one of

- ``"authmilter-test: SERVFAIL"`` → every query at that name raises :class:`DNSTempError`
  (as a SERVFAIL answer does through the real resolver);
- ``"authmilter-test: TIMEOUT"`` → :class:`DNSTempError` (as a server that never answers);
- ``"authmilter-test: MALFORMED"`` → :class:`DNSPermError` (as a broken answer)

turns the name into a failure. This is a convention of this fake only: NSD serves such a
record as plain data, so names carrying a marker are for unit tests only; an end-to-end test
produces real failures with :class:`dnsserver.BlackholeDns` or :class:`dnsserver.ScriptedDns`.

``queries`` counts every call to :meth:`ZoneResolver.query` (``txt`` included) and
``query_log`` keeps ``(name, type)`` in order, so tests of caching layers above can assert
how often DNS was asked. There is no cache here.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping

import dns.exception
import dns.name
import dns.node
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.txtbase
import dns.zone

from authmilter.errors import DNSNameNotFound, DNSPermError, DNSTempError
from authmilter.resolver import Resolver

__all__ = ["MARKER_PREFIX", "ZoneResolver", "failure_marker"]

#: Text that starts every failure marker.
MARKER_PREFIX = "authmilter-test: "
_MARKERS = {
    "SERVFAIL": (DNSTempError, "SERVFAIL"),
    "TIMEOUT": (DNSTempError, "timed out"),
    "MALFORMED": (DNSPermError, "malformed answer"),
}
_MAX_CNAME_CHAIN = 16


def failure_marker(kind: str) -> str:
    """Return the zone-file rdata of a failure marker: ``SERVFAIL``, ``TIMEOUT`` or ``MALFORMED``.

    Use as ``(owner, "TXT", failure_marker("SERVFAIL"))`` in :func:`dnsserver.make_zone`.

    :raises ValueError: unknown kind.
    """
    if kind not in _MARKERS:
        raise ValueError(f"unknown failure marker {kind!r} (known: {', '.join(_MARKERS)})")
    return f'"{MARKER_PREFIX}{kind}"'


class ZoneResolver:
    """Answer queries from zone text, with the contract of :class:`authmilter.resolver.Resolver`.

    :param zone_text: zone-file text (as :func:`dnsserver.make_zone` writes it).
    :param origin: the zone's origin, e.g. ``"example.test"``.
    :raises dns.exception.SyntaxError: the zone text does not parse (the test is wrong).
    """

    def __init__(self, zone_text: str, origin: str) -> None:
        self._zones: list[dns.zone.Zone] = []
        self._lock = threading.Lock()
        self.queries = 0
        self.query_log: list[tuple[str, str]] = []
        self.deadlines: list[float] = []
        self.add_zone(zone_text, origin)

    @classmethod
    def from_zones(cls, zones: Mapping[str, str]) -> ZoneResolver:
        """Build a resolver serving several zones, ``{origin: zone_text}`` as for ``nsd_server``.

        :raises ValueError: ``zones`` is empty.
        """
        items = list(zones.items())
        if not items:
            raise ValueError("ZoneResolver needs at least one zone")
        first_origin, first_text = items[0]
        resolver = cls(first_text, first_origin)
        for origin, text in items[1:]:
            resolver.add_zone(text, origin)
        return resolver

    def add_zone(self, zone_text: str, origin: str) -> None:
        """Serve one more zone (the most specific zone answers a name)."""
        zone = dns.zone.from_text(
            zone_text, origin=origin.rstrip(".") + ".", relativize=False, check_origin=True
        )
        self._zones.append(zone)
        self._zones.sort(key=lambda z: len(_origin(z).labels), reverse=True)

    # -- the Resolver contract --------------------------------------------------------------

    def query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        """Look up ``name``/``rdtype`` in the zones.

        :returns: the records, ``[]`` on NODATA.
        :raises ValueError: ``rdtype`` is not a DNS type name.
        :raises DNSNameNotFound: NXDOMAIN.
        :raises DNSTempError: a SERVFAIL/TIMEOUT marker, or a name outside every zone.
        :raises DNSPermError: a MALFORMED marker, or a malformed name.
        """
        try:
            qtype = dns.rdatatype.from_text(rdtype)
        except dns.rdatatype.UnknownRdatatype:
            raise ValueError(f"unknown DNS record type {rdtype!r}") from None
        what = f"{name} {dns.rdatatype.to_text(qtype)}"
        with self._lock:
            self.queries += 1
            self.query_log.append((name, dns.rdatatype.to_text(qtype)))
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            raise DNSPermError(f"{what}: malformed name: {exc}") from None

        for _ in range(_MAX_CNAME_CHAIN):
            zone = self._zone_for(qname)
            if zone is None:
                raise DNSTempError(f"{what}: no nameserver gave an answer (REFUSED)")
            node = self._find_node(zone, qname)
            if node is None:
                raise DNSNameNotFound(f"{what}: no such domain (NXDOMAIN)")
            self._check_marker(node, what)
            rdataset = node.get_rdataset(dns.rdataclass.IN, qtype)
            if rdataset is not None:
                return list(rdataset)
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None or qtype == dns.rdatatype.CNAME:
                return []
            target = next(iter(cname))
            assert isinstance(target, dns.rdtypes.ANY.CNAME.CNAME)
            qname = target.target
        raise DNSPermError(f"{what}: CNAME chain longer than {_MAX_CNAME_CHAIN}")

    #: The resolver's own methods, on :meth:`query`: TXT records with their character-strings
    #: joined, and dkimpy's ``dnsfunc=`` (the first of them).
    txt = Resolver.txt
    dkimpy_dnsfunc = Resolver.dkimpy_dnsfunc

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """The per-stage budget of :meth:`authmilter.resolver.Resolver.deadline`: zone answers
        take no time, so only the budgets asked for are recorded (in ``deadlines``)."""
        if not seconds > 0:
            raise ValueError(f"DNS deadline must be positive, not {seconds}")
        self.deadlines.append(seconds)
        yield

    # -- internals --------------------------------------------------------------------------

    def _zone_for(self, qname: dns.name.Name) -> dns.zone.Zone | None:
        for zone in self._zones:  # most specific origin first
            if qname.is_subdomain(_origin(zone)):
                return zone
        return None

    def _find_node(self, zone: dns.zone.Zone, qname: dns.name.Name) -> dns.node.Node | None:
        """The node answering ``qname``: itself, an empty non-terminal, or a wildcard."""
        node = zone.get_node(qname)
        if node is not None:
            return node
        names = list(zone.nodes.keys())
        if any(n.is_subdomain(qname) for n in names):
            return dns.node.Node()  # type: ignore[no-untyped-call]  # an empty non-terminal
        # RFC 4592: the closest encloser is the longest existing ancestor; "*" below it matches.
        encloser = qname.parent()
        while True:
            if zone.get_node(encloser) is not None or any(n.is_subdomain(encloser) for n in names):
                break
            if encloser == _origin(zone):
                break
            encloser = encloser.parent()
        return zone.get_node(dns.name.Name((b"*", *encloser.labels)))

    @staticmethod
    def _check_marker(node: dns.node.Node, what: str) -> None:
        txt = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.TXT)
        if txt is None:
            return
        for rdata in txt:
            if not isinstance(rdata, dns.rdtypes.txtbase.TXTBase):
                continue
            text = b"".join(rdata.strings).decode("utf-8", "replace")
            if text.startswith(MARKER_PREFIX):
                kind = text[len(MARKER_PREFIX) :].strip()
                if kind in _MARKERS:
                    exc_type, detail = _MARKERS[kind]
                    raise exc_type(f"{what}: {detail} (test marker)")


def _origin(zone: dns.zone.Zone) -> dns.name.Name:
    assert zone.origin is not None  # from_text always sets it
    return zone.origin
