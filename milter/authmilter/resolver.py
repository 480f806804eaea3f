"""The one DNS resolver of the process: dnspython underneath, a TTL cache on top.

Everything that needs DNS (DKIM key lookups through :meth:`Resolver.dkimpy_dnsfunc`, the
``testkey`` command, later SPF and DMARC) goes through one :class:`Resolver`, so one cache
and one timeout policy apply to the whole process.

Failures are mapped onto the exception kinds of :mod:`authmilter.errors`:

================================================  ===============================
DNS outcome                                       result
================================================  ===============================
answer with records                               list of records
NOERROR without records of the type (NODATA)      ``[]``
NXDOMAIN                                          :class:`DNSNameNotFound`
timeout, SERVFAIL, REFUSED, nobody answering      :class:`DNSTempError`
malformed answer, malformed name, YXDOMAIN        :class:`DNSPermError`
================================================  ===============================

Positive answers are cached for their TTL; NXDOMAIN and NODATA are cached per RFC 2308 §5
for ``min(SOA TTL, SOA MINIMUM)`` of the SOA in the authority section (not cached without
one); temporary failures are never cached.

What is computed from DNS answers can be cached with them: :meth:`Resolver.memo` keeps a
value (an SPF result, a parsed DKIM key record, a DMARC policy discovery) until the first of
the answers it was computed from expires, and never when a lookup failed while computing it.
The cache is written here rather than taken from dnspython (``dns.resolver.LRUCache``): that
one reads the wall clock itself, and the tests need to expire entries with an injected clock;
it also knows nothing of which answers a value depends on.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rdtypes.txtbase
import dns.resolver

from authmilter import metrics
from authmilter.errors import ConfigError, DNSNameNotFound, DNSPermError, DNSTempError

if TYPE_CHECKING:
    from authmilter.config import Config

__all__ = [
    "DEFAULT_PORT",
    "MAX_NEGATIVE_TTL",
    "MAX_POSITIVE_TTL",
    "CacheStats",
    "DnssecTxt",
    "Resolver",
    "memoized",
    "parse_nameserver",
    "parse_nameservers",
]

#: Port used when a nameserver spec has none.
DEFAULT_PORT = 53
#: Cap on the lifetime of a cached positive answer, in seconds (one day).
MAX_POSITIVE_TTL = 86_400
#: Cap on the lifetime of a cached negative answer, in seconds. RFC 2308 §5 suggests 1–3 hours
#: as a sane maximum; an hour keeps a freshly published DKIM key from staying "missing" long.
MAX_NEGATIVE_TTL = 3_600


def parse_nameserver(spec: str) -> tuple[str, int]:
    """Parse one nameserver spec into ``(address, port)``.

    Accepted forms: ``192.0.2.1``, ``192.0.2.1:5353``, ``2001:db8::1``, ``[2001:db8::1]``,
    ``[2001:db8::1]:5353``. The address must be a literal IP address (as OpenDKIM's
    ``Nameservers``); the port defaults to 53.

    :raises ValueError: the spec is not one of those forms, the address is not an IP address
        or the port is not in 1..65535.
    """
    text = spec.strip()
    if not text:
        raise ValueError("empty nameserver entry")
    port_text: str | None = None
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"nameserver {spec!r}: missing ']' after IPv6 address")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"nameserver {spec!r}: expected ':port' after ']'")
            port_text = rest[1:]
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"nameserver {spec!r}: {host!r} is not an IPv6 address") from None
    elif text.count(":") == 1:
        # Exactly one colon: IPv4 with port (a bare IPv6 address has at least two).
        host, _, port_text = text.partition(":")
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"nameserver {spec!r}: {host!r} is not an IPv4 address") from None
    else:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(
                f"nameserver {spec!r} is not an IP address (forms: 192.0.2.1, 192.0.2.1:5353, "
                "2001:db8::1, [2001:db8::1]:5353)"
            ) from None
    port = DEFAULT_PORT
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()):
            raise ValueError(f"nameserver {spec!r}: port {port_text!r} is not a number")
        port = int(port_text)
        if not 1 <= port <= 65_535:
            raise ValueError(f"nameserver {spec!r}: port {port} is out of range 1..65535")
    return str(address), port


def parse_nameservers(text: str) -> list[tuple[str, int]]:
    """Parse OpenDKIM's comma-separated ``Nameservers`` value, with an optional port per entry.

    Example: ``"127.0.0.1:5353, [::1]:5353, 192.0.2.53"``.

    :raises ValueError: an entry is malformed (the message names it) or the list is empty.
    """
    entries = [part.strip() for part in text.split(",")]
    if not any(entries):
        raise ValueError("Nameservers: no nameserver given")
    result: list[tuple[str, int]] = []
    for index, entry in enumerate(entries, start=1):
        if not entry:
            raise ValueError(f"Nameservers: entry {index} of {text!r} is empty")
        result.append(parse_nameserver(entry))
    return result


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheStats:
    """A snapshot of the resolver cache counters."""

    hits: int
    misses: int
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DnssecTxt:
    """The answer of :meth:`Resolver.txt_dnssec`: TXT records and whether they were validated.

    ``authenticated`` is the AD flag of the response: a validating resolver sets it when it
    checked every record of the answer with DNSSEC (RFC 4035 §3.2.3, RFC 6840 §5.7). An
    authoritative server, a resolver that does not validate, and an unsigned zone leave it
    clear. The flag is only as trustworthy as the path to that resolver (RFC 6840 §5.7: on
    this host or over a secured channel).
    """

    #: One ``bytes`` per TXT record (its character-strings concatenated), in answer order;
    #: empty on NODATA.
    records: tuple[bytes, ...]
    #: The AD flag of the response.
    authenticated: bool
    #: The nameserver that answered, as ``address:port`` (``[address]:port`` for IPv6).
    nameserver: str


class _Kind(Enum):
    """What a cache entry holds."""

    DATA = "data"
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"


@dataclass(frozen=True, slots=True)
class _Entry:
    kind: _Kind
    expires: float
    records: tuple[dns.rdata.Rdata, ...] = ()


T = TypeVar("T")


@functools.lru_cache(maxsize=4096)
def _question(name: str, rdtype: str) -> tuple[tuple[str, int], dns.name.Name,
                                               dns.rdatatype.RdataType, str]:  # fmt: skip
    """The cache key, the name and the type of a query, and how messages name it.

    Parsing a name with dnspython costs more than the cache lookup it leads to, and a busy
    MX asks the same few names all day: the parse is kept for the 4096 most recent (name,
    type) pairs (``Name`` objects are immutable). Errors are not kept.

    :raises ValueError: ``rdtype`` is not a DNS type name.
    :raises DNSPermError: the name is malformed.
    """
    try:
        qtype = dns.rdatatype.from_text(rdtype)
    except dns.rdatatype.UnknownRdatatype:
        raise ValueError(f"unknown DNS record type {rdtype!r}") from None
    what = f"{name} {dns.rdatatype.to_text(qtype)}"
    try:
        qname = dns.name.from_text(name)
    except dns.exception.DNSException as exc:
        raise DNSPermError(f"{what}: malformed name: {exc}") from None
    return (qname.to_text().lower(), int(qtype)), qname, qtype, what


def memoized(resolver: object, key: Hashable, compute: Callable[[], T],
             keep: Callable[[T], bool] | None = None) -> T:  # fmt: skip
    """:meth:`Resolver.memo` when ``resolver`` has it; otherwise (a test's fake resolver)
    ``compute()`` every time."""
    method = getattr(resolver, "memo", None)
    if method is None:
        return compute()
    return method(key, compute, keep)  # type: ignore[no-any-return]


# Exceptions inside NoNameservers that mean "the answer itself is broken", not "try later".
def _lookup_error(exc: Exception, what: str, lifetime: float) -> Exception:
    """Our error for a failed lookup (NXDOMAIN aside, which each caller answers itself)."""
    if isinstance(exc, dns.exception.Timeout):
        return DNSTempError(f"{what}: timed out after {lifetime:.3g}s ({exc})")
    if isinstance(exc, dns.resolver.NoNameservers):
        return _classify_no_nameservers(exc, what)
    if isinstance(exc, dns.resolver.YXDOMAIN):
        return DNSPermError(f"{what}: name too long after DNAME rewrite (YXDOMAIN)")
    if isinstance(exc, dns.resolver.NoAnswer):  # not raised with raise_on_no_answer=False
        return DNSPermError(f"{what}: unexpected empty answer ({exc})")
    if isinstance(exc, _MALFORMED):
        return DNSPermError(f"{what}: malformed answer: {exc}")
    if isinstance(exc, OSError):
        return DNSTempError(f"{what}: network error: {exc}")
    return DNSTempError(f"{what}: lookup failed: {exc}")


_MALFORMED = (
    dns.exception.FormError,
    dns.exception.SyntaxError,
    dns.name.NameTooLong,
    dns.message.ChainTooLong,
    dns.message.AnswerForNXDOMAIN,
)


class Resolver:
    """A thread-safe caching stub resolver built on :class:`dns.resolver.Resolver`.

    :param nameservers: nameserver specs (see :func:`parse_nameserver`; an entry may also be a
        comma-separated list); ``None`` or empty uses ``resolv_conf``.
    :param timeout: the deadline of one lookup in seconds, all retries included (dnspython's
        ``lifetime``).
    :param cache_size: the most (name, type) answers kept; least recently used go first.
        ``0`` disables the cache.
    :param resolv_conf: the resolv.conf read when no nameservers are given.
    :param clock: a monotonic clock in seconds; tests inject a fake one to expire entries.
    :raises ValueError: a nameserver spec is malformed, or timeout/cache_size are negative.
    :raises ConfigError: no nameservers were given and ``resolv_conf`` names none.
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        timeout: float = 5.0,
        cache_size: int = 10_000,
        resolv_conf: str = "/etc/resolv.conf",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"DNS timeout must be positive, not {timeout}")
        if cache_size < 0:
            raise ValueError(f"DNS cache size must not be negative, not {cache_size}")
        if isinstance(nameservers, str):
            nameservers = [nameservers]  # one spec (or a comma list), not a sequence of chars
        if nameservers:
            servers = [ns for spec in nameservers for ns in parse_nameservers(spec)]
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in servers]
        else:
            try:
                resolver = dns.resolver.Resolver(filename=resolv_conf, configure=True)
            except dns.resolver.NoResolverConfiguration as exc:
                raise ConfigError(f"{resolv_conf}: no usable nameserver ({exc})") from None
        # lifetime is the deadline of one lookup; each server gets an equal share of it, so a
        # dead first server leaves time for the next one to answer.
        resolver.timeout = timeout / max(1, len(resolver.nameservers))
        resolver.lifetime = timeout
        resolver.cache = None
        self._resolver = resolver
        self._timeout = timeout
        self._cache_size = cache_size
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        # memo(): key -> (valid until, value), least recently used first.
        self._derived: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._hits = 0
        self._misses = 0
        # .deadline: this thread's budget end, or absent; .watches: for each memo()
        # computing in this thread (innermost last), when its first answer expires.
        self._local = threading.local()

    @property
    def timeout(self) -> float:
        """The per-lookup deadline in seconds."""
        return self._timeout

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        """The ``(address, port)`` pairs queried, in order."""
        result: list[tuple[str, int]] = []
        for ns in self._resolver.nameservers:
            if isinstance(ns, dns.nameserver.AddressAndPortNameserver):
                result.append((ns.address, ns.port))
            else:
                result.append((str(ns), self._resolver.port))
        return result

    @property
    def stats(self) -> CacheStats:
        """Cache hit/miss counters and the current number of entries."""
        with self._lock:
            return CacheStats(hits=self._hits, misses=self._misses, size=len(self._cache))

    def clear_cache(self) -> None:
        """Forget every cached answer and what :meth:`memo` kept (the counters are kept)."""
        with self._lock:
            self._cache.clear()
            self._derived.clear()

    def memo(self, key: Hashable, compute: Callable[[], T],
             keep: Callable[[T], bool] | None = None) -> T:  # fmt: skip
        """``compute()``, or what it returned for ``key`` while the answers it read are fresh.

        The value is kept until the first of the DNS answers ``compute`` read (through this
        resolver, in this thread, cached or not) expires, and not at all when one of its
        lookups failed (timeout, SERVFAIL, malformed answer, the :meth:`deadline` spent) or
        was not cacheable, when ``keep(value)`` is false, or when ``compute`` raised. The
        key must name every input of ``compute`` other than DNS. Memos may nest: an inner
        value's lifetime bounds the outer one's. At most ``cache_size`` values are kept.
        """
        if self._cache_size == 0:
            return compute()
        with self._lock:
            found = self._derived.get(key)
            if found is not None:
                if found[0] > self._clock():
                    self._derived.move_to_end(key)
                else:
                    del self._derived[key]
                    found = None
        if found is not None:
            self._depends(found[0])
            return found[1]  # type: ignore[no-any-return]
        watches: list[float] | None = getattr(self._local, "watches", None)
        if watches is None:
            watches = self._local.watches = []
        watches.append(math.inf)
        try:
            value = compute()
        finally:
            until = watches.pop()
        self._depends(until)
        if until > self._clock() and (keep is None or keep(value)):
            with self._lock:
                self._derived[key] = (until, value)
                self._derived.move_to_end(key)
                while len(self._derived) > self._cache_size:
                    self._derived.popitem(last=False)
        return value

    def _depends(self, expires: float) -> None:
        """The memos computing in this thread read an answer that expires at ``expires``
        (``-inf``: a lookup failed, nothing computed from it may be kept)."""
        watches: list[float] | None = getattr(self._local, "watches", None)
        if watches:
            for i, until in enumerate(watches):
                if expires < until:
                    watches[i] = expires

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Bound all lookups of this thread inside the block to ``seconds`` in total.

        Within the block each lookup waits at most ``min(timeout, time left)``; once the time
        is spent a lookup that the cache cannot answer raises :class:`DNSTempError` without
        asking. This keeps one SMTP stage of a message (SPF at RCPT, DKIM and DMARC at end of
        message) under the MTA's milter timeouts however many lookups it needs. Blocks nest;
        the earlier end wins.

        :raises ValueError: ``seconds`` is not positive.
        """
        if not seconds > 0:
            raise ValueError(f"DNS deadline must be positive, not {seconds}")
        outer: float | None = getattr(self._local, "deadline", None)
        end = self._clock() + seconds
        self._local.deadline = end if outer is None else min(outer, end)
        try:
            yield
        finally:
            self._local.deadline = outer

    def query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        """Look up ``name``/``rdtype`` (``"A"``, ``"AAAA"``, ``"MX"``, ``"PTR"``, ``"TXT"`` …).

        The name is taken as absolute (no search list). CNAMEs are followed and the records of
        the requested type at the end of the chain are returned, in answer order.

        :returns: the records; ``[]`` when the name exists but has none of that type (NODATA).
        :raises ValueError: ``rdtype`` is not a DNS type name.
        :raises DNSNameNotFound: NXDOMAIN.
        :raises DNSTempError: timeout, SERVFAIL/REFUSED, no nameserver answering, or the
            :meth:`deadline` of this thread passed.
        :raises DNSPermError: malformed name or malformed answer.
        """
        try:
            key, qname, qtype, what = _question(name, rdtype)
        except DNSPermError:
            self._depends(-math.inf)
            raise

        entry = self._cache_get(key)
        if entry is not None:
            return self._from_entry(entry, what)

        try:
            entry = self._lookup(qname, qtype, what)
        except (DNSTempError, DNSPermError):
            self._depends(-math.inf)
            raise
        self._cache_put(key, entry)
        return self._from_entry(entry, what)

    def txt(self, name: str) -> list[bytes]:
        """Return the TXT records at ``name``, each one's character-strings concatenated.

        :returns: one ``bytes`` per TXT record, in answer order; ``[]`` on NODATA.
        :raises DNSNameNotFound: NXDOMAIN.
        :raises DNSTempError: as :meth:`query`.
        :raises DNSPermError: as :meth:`query`.
        """
        return [
            b"".join(rdata.strings)
            for rdata in self.query(name, "TXT")
            if isinstance(rdata, dns.rdtypes.txtbase.TXTBase)
        ]

    def dkimpy_dnsfunc(self, name: bytes | str, timeout: float = 5.0) -> bytes | None:
        """Serve dkimpy's ``dnsfunc=``: the first TXT record at ``name``, or ``None``.

        dkimpy 1.1 calls ``dnsfunc(name, timeout=...)`` with the query name as bytes and
        treats ``None`` as "no key". Like dkimpy's own ``get_txt``, the first TXT record is
        returned when several exist; NXDOMAIN and NODATA give ``None``. dkimpy's ``timeout``
        is ignored: the process-wide deadline of this resolver applies.

        :raises DNSTempError: the lookup failed transiently (the caller maps it to temperror).
        :raises DNSPermError: the answer was malformed (the caller maps it to permerror).
        """
        del timeout  # the resolver's own deadline applies
        if isinstance(name, bytes):
            try:
                name = name.decode("utf-8")
            except UnicodeDecodeError:
                return None
        try:
            records = self.txt(name)
        except DNSNameNotFound:
            return None
        return records[0] if records else None

    def txt_dnssec(self, name: str) -> DnssecTxt:
        """Look up the TXT records at ``name`` asking for DNSSEC, past the cache.

        The query carries EDNS0 with the DO bit and sets the AD flag (RFC 3225, RFC 6840 §5.7),
        so a validating resolver among the nameservers says in the AD flag of its response
        whether it validated the records; see :class:`DnssecTxt`. The signatures themselves
        are not checked here. For the ``testkey`` command: the answer is not cached (the cache
        keeps no AD flag) and does not count in the metrics.

        :raises DNSNameNotFound: NXDOMAIN.
        :raises DNSTempError: as :meth:`query`.
        :raises DNSPermError: as :meth:`query`.
        """
        what = f"{name} TXT"
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            raise DNSPermError(f"{what}: malformed name: {exc}") from None
        resolver = copy.copy(self._resolver)
        resolver.use_edns(0, dns.flags.DO)
        resolver.flags = dns.flags.RD | dns.flags.AD
        lifetime = self._timeout
        end: float | None = getattr(self._local, "deadline", None)
        if end is not None:
            lifetime = min(lifetime, end - self._clock())
            if lifetime <= 0:
                raise DNSTempError(f"{what}: not asked, the DNS time is spent (DNSDeadline)")
        try:
            answer = resolver.resolve(qname, dns.rdatatype.TXT, raise_on_no_answer=False,
                                      search=False, lifetime=lifetime)  # fmt: skip
        except dns.resolver.NXDOMAIN:
            raise DNSNameNotFound(f"{what}: no such domain (NXDOMAIN)") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise _lookup_error(exc, what, lifetime) from None
        records = tuple(b"".join(rdata.strings) for rdata in answer.rrset or ()
                        if isinstance(rdata, dns.rdtypes.txtbase.TXTBase))  # fmt: skip
        address = str(answer.nameserver)
        host = f"[{address}]" if ":" in address else address
        return DnssecTxt(
            records=records,
            authenticated=bool(answer.response.flags & dns.flags.AD),
            nameserver=f"{host}:{answer.port}",
        )

    # -- internals ------------------------------------------------------------------------

    def _from_entry(self, entry: _Entry, what: str) -> list[dns.rdata.Rdata]:
        self._depends(entry.expires)
        if entry.kind is _Kind.NXDOMAIN:
            raise DNSNameNotFound(f"{what}: no such domain (NXDOMAIN)")
        return list(entry.records)

    def _cache_get(self, key: tuple[str, int]) -> _Entry | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and entry.expires > self._clock():
                self._cache.move_to_end(key)
                self._hits += 1
            else:
                if entry is not None:
                    del self._cache[key]
                    entry = None
                self._misses += 1
        metrics.dns_cache(entry is not None)
        return entry

    def _cache_put(self, key: tuple[str, int], entry: _Entry) -> None:
        if self._cache_size == 0 or entry.expires <= self._clock():
            return
        with self._lock:
            self._cache[key] = entry
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _lookup(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, what: str) -> _Entry:
        """Ask the nameservers; return an entry whose ``expires`` is now when not cacheable."""
        now = self._clock()
        lifetime = self._timeout
        end: float | None = getattr(self._local, "deadline", None)
        if end is not None:
            left = end - now
            if left <= 0:
                raise DNSTempError(f"{what}: not asked, the message's DNS time is spent "
                                   "(DNSDeadline)")  # fmt: skip
            lifetime = min(lifetime, left)
        rdtype = dns.rdatatype.to_text(qtype)
        started = time.perf_counter()
        try:
            entry = self._ask(qname, qtype, what, lifetime, now)
        except (DNSTempError, DNSPermError) as e:
            outcome = "temperror" if isinstance(e, DNSTempError) else "permerror"
            metrics.dns_query(rdtype, outcome, time.perf_counter() - started)
            raise
        metrics.dns_query(rdtype, _OUTCOME[entry.kind], time.perf_counter() - started)
        return entry

    def _ask(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, what: str,
             lifetime: float, now: float) -> _Entry:  # fmt: skip
        try:
            answer = self._resolver.resolve(
                qname, qtype, raise_on_no_answer=False, search=False, lifetime=lifetime
            )
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses") or {}
            response = responses.get(qname)
            ttl = _negative_ttl(response) if response is not None else None
            return _Entry(_Kind.NXDOMAIN, now + (ttl or 0))
        except (dns.exception.DNSException, OSError) as exc:
            raise _lookup_error(exc, what, lifetime) from None

        if answer.rrset is None:
            ttl = _negative_ttl(answer.response)
            return _Entry(_Kind.NODATA, now + (ttl or 0))
        ttl = min(rrset.ttl for rrset in answer.response.answer) if answer.response.answer else 0
        ttl = min(ttl, answer.rrset.ttl, MAX_POSITIVE_TTL)
        return _Entry(_Kind.DATA, now + ttl, tuple(answer.rrset))


_OUTCOME = {_Kind.DATA: "ok", _Kind.NODATA: "nodata", _Kind.NXDOMAIN: "nxdomain"}


def _negative_ttl(response: dns.message.Message) -> int | None:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM); no SOA, no caching."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
            soa = rrset[0]
            if isinstance(soa, dns.rdtypes.ANY.SOA.SOA):
                return min(rrset.ttl, soa.minimum, MAX_NEGATIVE_TTL)
    return None


def _classify_no_nameservers(exc: dns.resolver.NoNameservers, what: str) -> Exception:
    """Decide temp vs perm from the per-server errors dnspython collected.

    Perm only when every server that failed sent a malformed answer; timeouts, SERVFAIL,
    REFUSED and network errors make it temp (another try may work).
    """
    errors = exc.kwargs.get("errors") or []
    reasons: list[str] = []
    kinds: set[bool] = set()
    for error in errors:
        server, problem = error[0], error[3]  # server is e.g. "Do53:192.0.2.1@53"
        if isinstance(problem, dns.message.Truncated):
            continue  # a UDP answer with TC set: a step towards TCP, not a failure
        reasons.append(f"{server}: {problem}")
        kinds.add(isinstance(problem, _MALFORMED))
    detail = "; ".join(reasons) if reasons else "no nameserver answered"
    if kinds == {True}:
        return DNSPermError(f"{what}: malformed answer ({detail})")
    return DNSTempError(f"{what}: no nameserver gave an answer ({detail})")


def config_resolver(cfg: Config) -> Resolver:
    """The resolver a configuration names (``Nameservers``, ``DNSTimeout``), as the milter,
    ``reports send`` and the failure reporter each use it.

    ``DNSTimeout 0`` means "wait forever" to OpenDKIM; a milter must answer Postfix in time,
    so 0 is 30 seconds here.

    :raises ConfigError: a ``Nameservers`` entry that is not an address, at its line.
    """
    try:
        return Resolver(cfg.nameservers or None, timeout=float(cfg.dns_timeout or 30))
    except ValueError as e:
        raise ConfigError(f"Nameservers: {e}", cfg.location("nameservers")) from None
