"""Where DMARC reports may go: the ``mailto:`` URIs of ``rua=``/``ruf=``, checked as RFC 9990
("Verifying External Destinations") and RFC 9991 ask, for aggregate and failure reports alike.

:func:`check_destinations` takes the URIs a policy record published and returns the addresses
a report may be sent to, the URIs dropped (with why) and the URIs deferred (a DNS temporary
error while verifying: try again at the next run).

The rules, in order, for each URI:

* Only ``mailto:`` is used (the only scheme RFC 9990 defines); other schemes and malformed URIs
  are dropped. The ``!size`` suffix of RFC 7489 is obsolete (RFC 9989) and ignored.
* Same organization: when the organizational domain of the address's host is that of the policy
  domain, the address is used as it is, with no DNS query.
* Otherwise the destination must agree: a TXT query for
  ``<policy-domain>._report._dmarc.<host>``. Exactly one record starting with ``v=DMARC1``
  (wildcards at the destination work as any DNS wildcard does) is a yes; no record, NXDOMAIN,
  several records or a malformed one is a no, and the URI is dropped; a temporary DNS error
  defers it.
* Override: when that record has a ``rua=`` (aggregate) or ``ruf=`` (failure) tag, its URIs
  replace the published one, but only those whose host is the same destination host (so a
  verifying domain cannot redirect reports to a third party, RFC 7489 section 7.1); the others
  are dropped.

Hand-written because no maintained Python library does this check (checkdmarc reports on a
domain's own records; parsedmarc only reads reports); it is a few lines over our resolver.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from authmilter.dkim_verify import TxtLookup
from authmilter.errors import DNSNameNotFound, DNSPermError, DNSTempError

__all__ = ["Destinations", "check_destinations", "mailto_address", "skipped_domain"]


@dataclass(frozen=True, slots=True)
class Destinations:
    """The outcome of :func:`check_destinations`.

    :param addresses: the mailto addresses a report may go to, in order, without duplicates.
    :param dropped: ``(uri, why)`` for every URI not used.
    :param deferred: ``(uri, why)`` for every URI whose verification failed transiently.
    """

    addresses: tuple[str, ...]
    dropped: tuple[tuple[str, str], ...] = ()
    deferred: tuple[tuple[str, str], ...] = ()


def mailto_address(uri: str) -> str | None:
    """The address of a ``mailto:`` URI (``!size`` and ``?headers`` left out, %-escapes
    decoded), or ``None`` for another scheme or a malformed URI."""
    text = uri.strip()
    if text[:7].lower() != "mailto:":
        return None
    text = text[7:].split("?", 1)[0]
    if "!" in text:  # RFC 7489's size limit, obsolete in RFC 9989: ignored
        text = text.rpartition("!")[0]
    addr = urllib.parse.unquote(text).strip()
    local, at, host = addr.rpartition("@")
    if not at or not local or "@" in local and not local.startswith('"'):
        return None
    if any(c.isspace() or c in "<>,;()[]\\" for c in addr) or "." not in host.strip("."):
        return None
    return f"{local}@{host.rstrip('.').lower()}"


def _host(address: str) -> str:
    return address.rpartition("@")[2]


def _tags(record: str) -> dict[str, str] | None:
    """``tag=value`` pairs of a verification record; ``None`` when it is not ``v=DMARC1``."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        if not eq:
            return None
        tags.setdefault(name.strip().lower(), value.strip())
    return tags if tags.get("v") == "DMARC1" and record.lstrip().startswith("v") else None


def _verify(policy_domain: str, host: str, resolver: TxtLookup,
            kind: str) -> tuple[bool | None, str, tuple[str, ...]]:  # fmt: skip
    """``(verdict, why, override URIs)``; verdict ``None`` means a temporary error."""
    name = f"{policy_domain}._report._dmarc.{host}"
    try:
        answers = resolver.txt(name)
    except DNSNameNotFound:
        return False, f"no verification record at {name} (NXDOMAIN)", ()
    except DNSTempError as e:
        return None, f"verification lookup of {name} failed: {e}", ()
    except DNSPermError as e:
        return False, f"verification lookup of {name} failed: {e}", ()
    texts = [a.decode("utf-8", "replace") for a in answers]
    dmarc = [t for t in texts if t.lstrip()[:8].lower().replace(" ", "").startswith("v=dmarc1")]
    if not dmarc:
        return False, f"no v=DMARC1 verification record at {name}", ()
    if len(dmarc) > 1:
        return False, f"{len(dmarc)} verification records at {name}", ()
    tags = _tags(dmarc[0])
    if tags is None:
        return False, f"malformed verification record at {name}: {dmarc[0]!r}", ()
    override = tags.get(kind)
    uris = tuple(u.strip() for u in override.split(",") if u.strip()) if override else ()
    return True, "", uris


def check_destinations(policy_domain: str, uris: Sequence[str], resolver: TxtLookup,
                       org_domain: Callable[[str], str], *,
                       kind: str = "rua") -> Destinations:  # fmt: skip
    """The addresses of ``uris`` (published by ``policy_domain``) a report may be sent to.

    :param resolver: TXT lookups (raises :class:`~authmilter.errors.DNSNameNotFound`,
        :class:`~authmilter.errors.DNSTempError`, :class:`~authmilter.errors.DNSPermError`).
    :param org_domain: the organizational domain of a name (PSL or tree walk, as the milter).
    :param kind: ``"rua"`` (aggregate) or ``"ruf"`` (failure): which override tag applies.
    """
    if kind not in ("rua", "ruf"):
        raise ValueError(f"kind: {kind!r} is not rua or ruf")
    policy_domain = policy_domain.lower().rstrip(".")
    policy_org = org_domain(policy_domain)
    addresses: list[str] = []
    dropped: list[tuple[str, str]] = []
    deferred: list[tuple[str, str]] = []

    def add(address: str) -> None:
        if address.lower() not in (a.lower() for a in addresses):
            addresses.append(address)

    checked: dict[str, tuple[bool | None, str, tuple[str, ...]]] = {}
    for uri in uris:
        address = mailto_address(uri)
        if address is None:
            dropped.append((uri, "not a usable mailto: URI"))
            continue
        host = _host(address)
        if org_domain(host) == policy_org:
            add(address)
            continue
        if host not in checked:
            checked[host] = _verify(policy_domain, host, resolver, kind)
        verdict, why, override = checked[host]
        if verdict is None:
            deferred.append((uri, why))
        elif not verdict:
            dropped.append((uri, why))
        elif not override:
            add(address)
        else:
            for other in override:
                replacement = mailto_address(other)
                if replacement is None:
                    dropped.append((other, f"override from {host}: not a usable mailto: URI"))
                elif _host(replacement) != host:
                    dropped.append((other, f"override from {host} names another host"))
                else:
                    add(replacement)
    return Destinations(tuple(addresses), tuple(dropped), tuple(deferred))


def skipped_domain(domain: str, skip: Iterable[str]) -> str | None:
    """The ``ReportSkipDomains`` entry that covers ``domain`` (it or a parent), or ``None``."""
    name = domain.lower().rstrip(".")
    for entry in skip:
        e = entry.strip().lower().strip(".")
        if e and (name == e or name.endswith("." + e)):
            return entry
    return None
