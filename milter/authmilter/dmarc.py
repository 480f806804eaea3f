"""DMARC: the author domain, policy records, policy discovery, alignment and the disposition.

Four steps, each usable alone:

1. The RFC 5322.From domain comes from :func:`authmilter.addresses.author_domain`, a strict
   mailbox-list parser of our own: anything ambiguous is ``UNPARSEABLE``, never a guess.
2. :func:`parse_record` reads one TXT string: :class:`NotDmarcRecord` when it is not a DMARC
   record at all (ignored by discovery), :class:`DmarcRecordError` when it is a broken one
   (permerror), a :class:`DmarcRecord` otherwise. RFC 7489 §6.3/§6.4 plus the DMARCbis tags
   ``np=``, ``t=``, ``psd=`` (RFC 9989).
3. :func:`discover` finds the policy record and the organizational domain, either the RFC 7489
   way (``_dmarc.<From>``, then ``_dmarc.<PSL org domain>``) or with the DMARCbis DNS tree walk.
4. :func:`evaluate` checks DKIM and SPF identifier alignment and turns the record into a
   :class:`~authmilter.results.DmarcOutcome`: result, applied policy (p/sp/np) and disposition
   after ``pct`` sampling and ``t=y`` testing.

DNS goes only through the resolver passed in (anything with ``txt(name)`` and
``query(name, rdtype)`` raising the :mod:`authmilter.errors` DNS exceptions); nothing is cached
here, the resolver caches. A temporary DNS failure is ``temperror``, never "no record".

Decisions where the RFCs leave a choice are marked in the code with the section they rest on;
DMARCbis sections are cited by title (``RFC 9989 "DNS Tree Walk"``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol

from publicsuffixlist import PublicSuffixList

from authmilter.addresses import AuthorDomain, FromStatus, normalize_domain
from authmilter.errors import (
    AuthmilterError,
    ConfigError,
    DNSNameNotFound,
    DNSPermError,
    DNSTempError,
)
from authmilter.resolver import memoized
from authmilter.results import (
    DkimOutcome,
    DkimResult,
    DmarcOutcome,
    DmarcPolicy,
    DmarcResult,
    SpfIdentity,
    SpfOutcome,
    SpfResult,
)
from authmilter.taglist import TagListError, parse_tag_list

__all__ = [
    "MAX_TREEWALK_QUERIES",
    "Discovery",
    "DmarcRecord",
    "DmarcRecordError",
    "DnsLookup",
    "NotDmarcRecord",
    "OrgDomainMethod",
    "PublicSuffix",
    "discover",
    "domain_exists",
    "evaluate",
    "parse_record",
    "treewalk_names",
    "org_domain_finder",
    "treewalk_org_domain",
]

#: RFC 9989 "DNS Tree Walk": at most this many ``_dmarc`` queries per walk.
MAX_TREEWALK_QUERIES = 8


class DnsLookup(Protocol):
    """What DMARC needs of a resolver: :class:`authmilter.resolver.Resolver` and the test fake."""

    def txt(self, name: str) -> list[bytes]:
        """TXT records at ``name``; ``[]`` on NODATA; raises the DNS errors of errors.py."""
        ...

    def query(self, name: str, rdtype: str) -> Sequence[object]:
        """Records of ``rdtype`` at ``name``; ``[]`` on NODATA; raises as :meth:`txt`."""
        ...


# =============================================================================================
# 2. DMARC records
# =============================================================================================


class NotDmarcRecord(Exception):  # a signal to skip the record, not an error
    """The TXT record is not a DMARC record (does not start with ``v=DMARC1``): skip it."""


class DmarcRecordError(AuthmilterError):
    """A ``v=DMARC1`` record that is broken: the result is permerror (conventions #7)."""


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """A parsed DMARC policy record (RFC 7489 §6.3 with the DMARCbis tags).

    Defaults are filled in: ``adkim``/``aspf`` ``"r"``, ``pct`` 100, ``fo`` ``"0"``, ``rf``
    ``"afrf"``, ``ri`` 86400, ``testing`` False, ``psd`` ``"u"``. ``sp``/``np`` stay ``None``
    when absent (the fallback to ``sp``/``p`` is the evaluator's). ``tags`` holds every tag as
    written (names lowercased), unknown ones included. ``warnings`` lists what was discarded
    (invalid report URIs, a policy replaced by ``p=none`` under RFC 7489 §6.6.3).
    """

    p: DmarcPolicy
    sp: DmarcPolicy | None
    np: DmarcPolicy | None
    adkim: str
    aspf: str
    pct: int
    rua: tuple[str, ...]
    ruf: tuple[str, ...]
    fo: str
    rf: str
    ri: int
    testing: bool
    psd: str
    tags: Mapping[str, str]
    warnings: tuple[str, ...] = field(default=())


_WSP = " \t\r\n"
# RFC 7489 §6.4 dmarc-uri = URI [ "!" 1*DIGIT [ "k" / "m" / "g" / "t" ] ]; a URI has a scheme,
# a colon and something after it, and no white space (commas must be %-encoded, §6.2).
_DMARC_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s!,;]+(?:![0-9]+[kmgtKMGT]?)?\Z")
_FO = re.compile(r"[01ds](?:[ \t]*:[ \t]*[01ds])*\Z", re.IGNORECASE)
_RF = re.compile(r"[A-Za-z][A-Za-z0-9-]*(?:[ \t]*:[ \t]*[A-Za-z][A-Za-z0-9-]*)*\Z")


def _policy_value(value: str) -> DmarcPolicy | None:
    try:
        return DmarcPolicy(value.lower())
    except ValueError:
        return None


def _uris(tag: str, value: str, warnings: list[str]) -> tuple[str, ...]:
    uris: list[str] = []
    for item in value.split(","):
        uri = item.strip(_WSP)
        if _DMARC_URI.match(uri):
            uris.append(uri)
        else:
            # RFC 7489 §6.3: syntax errors in the remainder are discarded.
            warnings.append(f"{tag}=: {uri!r} is not a valid DMARC URI; ignored")
    return tuple(uris)


def parse_record(text: str) -> DmarcRecord:
    """Parse the text of one TXT record as a DMARC record.

    The first tag must be ``v=DMARC1``: the tag name compared case-insensitively (the RFC 7489
    §6.4 ABNF quotes it, RFC 5234 §2.3), the value exactly (``%x44.4d.41.52.43.31``); anything
    else is not a DMARC record. White space is allowed around tags and ``=`` and at both ends.
    Unknown tags are kept in ``tags`` and otherwise ignored (§6.3).

    Tags that decide the outcome (``p``, ``sp``, ``np``, ``adkim``, ``aspf``, ``pct``, ``t``,
    ``psd``) must be valid, else the record is broken, as OpenDMARC has it — except that an
    invalid or missing ``p``, or an invalid ``sp``/``np``, with at least one valid ``rua`` URI
    gives a ``p=none`` record (RFC 7489 §6.6.3 step 6). Invalid reporting tags (``rua``, ``ruf``,
    ``fo``, ``rf``, ``ri``) are discarded in favour of their defaults (§6.3) with a warning:
    a bad report address must not change what happens to mail. A repeated tag makes the record
    broken (RFC 6376 §3.2, whose tag-list syntax §6.4 adopts).

    :raises NotDmarcRecord: the record does not start with ``v=DMARC1``.
    :raises DmarcRecordError: a broken DMARC record; the message names the tag.
    """
    segments = text.split(";")
    version_name, eq, version = segments[0].partition("=")
    if not eq or version_name.strip(_WSP).lower() != "v" or version.strip(_WSP) != "DMARC1":
        raise NotDmarcRecord(f"not a DMARC record: {text[:60]!r}")

    warnings: list[str] = []

    def malformed(error: TagListError) -> None:
        warnings.append(f"tag {error.index} {error.spec[:40]!r} is not name=value; ignored")

    # The first tag-spec is v=DMARC1 (checked above). Empty tag-specs ("p=none;", "; ;") are
    # skipped, names compared without case.
    try:
        tags = dict(parse_tag_list(text, fold_case=True, skip_malformed=malformed))
    except TagListError as exc:  # only a repeated tag raises here
        why = f"tag {exc.name}= appears more than once (RFC 6376 §3.2)"
        raise DmarcRecordError(why) from None

    def choice(tag: str, allowed: str, default: str) -> str:
        value = tags.get(tag)
        if value is None:
            return default
        if len(value) == 1 and value.lower() in allowed:
            return value.lower()
        raise DmarcRecordError(
            f"{tag}={value!r} is not one of {', '.join(allowed)} (RFC 7489 §6.3)"
        )

    adkim = choice("adkim", "rs", "r")
    aspf = choice("aspf", "rs", "r")
    testing = choice("t", "yn", "n") == "y"  # RFC 9989 "t" tag
    psd = choice("psd", "ynu", "u")  # RFC 9989 "psd" tag

    pct = 100
    if "pct" in tags:
        value = tags["pct"]
        # RFC 7489 §6.3: "pct": an integer 0..100 (ABNF 1*3DIGIT).
        if not re.fullmatch(r"[0-9]{1,3}", value) or int(value) > 100:
            raise DmarcRecordError(f"pct={value!r} is not an integer from 0 to 100")
        pct = int(value)

    rua = _uris("rua", tags["rua"], warnings) if "rua" in tags else ()
    ruf = _uris("ruf", tags["ruf"], warnings) if "ruf" in tags else ()

    fo = "0"
    if "fo" in tags:
        if _FO.match(tags["fo"]):
            fo = re.sub(r"[ \t]", "", tags["fo"]).lower()
        else:
            warnings.append(f"fo={tags['fo']!r} is invalid; the default fo=0 applies")
    rf = "afrf"
    if "rf" in tags:
        if _RF.match(tags["rf"]):
            rf = re.sub(r"[ \t]", "", tags["rf"]).lower()
        else:
            warnings.append(f"rf={tags['rf']!r} is invalid; the default rf=afrf applies")
    ri = 86400
    if "ri" in tags:
        if re.fullmatch(r"[0-9]{1,10}", tags["ri"]) and int(tags["ri"]) < 2**32:
            ri = int(tags["ri"])
        else:
            warnings.append(f"ri={tags['ri']!r} is invalid; the default ri=86400 applies")

    problems: list[str] = []
    p: DmarcPolicy | None = None
    if "p" not in tags:
        problems.append("p= is missing")
    else:
        p = _policy_value(tags["p"])
        if p is None:
            problems.append(f"p={tags['p']!r} is not none, quarantine or reject")
    sp = np = None
    for tag in ("sp", "np"):
        if tag in tags:
            policy = _policy_value(tags[tag])
            if policy is None:
                problems.append(f"{tag}={tags[tag]!r} is not none, quarantine or reject")
            elif tag == "sp":
                sp = policy
            else:
                np = policy
    if problems:
        if not rua:
            raise DmarcRecordError("; ".join(problems))
        # RFC 7489 §6.6.3 step 6: no valid p (or an invalid sp) but a valid rua: "act as if a
        # record containing a valid 'v' tag and 'p=none' was retrieved", so sp/np go too. An
        # invalid np (a DMARCbis tag) is treated as an invalid sp.
        warnings.append(
            f"{'; '.join(problems)}: treated as p=none because rua= is valid (RFC 7489 §6.6.3)"
        )
        p, sp, np = DmarcPolicy.NONE, None, None
    assert p is not None

    return DmarcRecord(
        p=p,
        sp=sp,
        np=np,
        adkim=adkim,
        aspf=aspf,
        pct=pct,
        rua=rua,
        ruf=ruf,
        fo=fo,
        rf=rf,
        ri=ri,
        testing=testing,
        psd=psd,
        tags=MappingProxyType(tags),
        warnings=tuple(warnings),
    )


# =============================================================================================
# 3. Organizational domain and policy discovery
# =============================================================================================


class OrgDomainMethod(StrEnum):
    """How the organizational domain is found (``OrganizationalDomainMethod``)."""

    PSL = "psl"  # RFC 7489 §3.2: the public suffix list
    TREEWALK = "treewalk"  # RFC 9989 "DNS Tree Walk"


class PublicSuffix:
    """The public suffix list, for the RFC 7489 §3.2 organizational domain.

    :param path: a ``public_suffix_list.dat`` file (OpenDMARC's ``PublicSuffixList``);
        ``None`` uses the list shipped in the ``publicsuffixlist`` package. The private
        section of the list is used too, as OpenDMARC does; a top-level domain not on the list
        is a public suffix (the list's default ``*`` rule).
    :raises ConfigError: the file cannot be read.
    """

    def __init__(self, path: str | None = None) -> None:
        if path is None:
            self._psl = PublicSuffixList()
        else:
            try:
                with open(path, "rb") as stream:
                    self._psl = PublicSuffixList(stream)
            except OSError as exc:
                raise ConfigError(f"PublicSuffixList: cannot read {path}: {exc.strerror}") from None
        self.path = path

    def org_domain(self, domain: str) -> str:
        """Return the organizational domain: the public suffix plus one label.

        RFC 7489 §3.2 step 4 leaves a domain that is itself a public suffix open (there is no
        "x+1"th label); it is its own organizational domain here.
        """
        name = domain.lower().rstrip(".")
        private = self._psl.privatesuffix(name)
        return str(private) if private else name


@dataclass(frozen=True, slots=True)
class Discovery:
    """Where the policy for a From domain came from.

    ``record`` is the policy record (``None`` when there is none or on error);
    ``record_domain`` the domain whose ``_dmarc`` name holds it (for an error, the one whose
    lookup failed or whose record is broken); ``org_domain`` the From domain's organizational
    domain; ``error`` TEMPERROR or PERMERROR; ``detail`` one line for logs and ``check-dmarc``;
    ``from_domain_exists`` whether the From domain exists, only when it was asked (``None``
    otherwise).
    """

    record: DmarcRecord | None
    record_domain: str | None
    org_domain: str | None
    error: DmarcResult | None
    detail: str
    from_domain_exists: bool | None


@dataclass(frozen=True, slots=True)
class _Fetched:
    records: tuple[DmarcRecord, ...]
    broken: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.records) + len(self.broken)


def _fetch(resolver: DnsLookup, domain: str) -> _Fetched:
    """The DMARC records at ``_dmarc.<domain>``: valid ones and the errors of broken ones.

    RFC 7489 §6.6.3 steps 2 and 4: TXT records that are not DMARC records are discarded.

    :raises DNSTempError: the lookup failed transiently.
    :raises DNSPermError: the answer was malformed.
    """
    try:
        texts = resolver.txt(f"_dmarc.{domain}")
    except DNSNameNotFound:
        texts = []
    records: list[DmarcRecord] = []
    broken: list[str] = []
    for raw in texts:
        try:
            records.append(parse_record(raw.decode("utf-8", "replace")))
        except NotDmarcRecord:
            continue
        except DmarcRecordError as exc:
            broken.append(str(exc))
    return _Fetched(tuple(records), tuple(broken))


def treewalk_names(domain: str) -> list[str]:
    """The names whose ``_dmarc`` records a DMARCbis tree walk from ``domain`` asks for.

    RFC 9989 "DNS Tree Walk": the domain itself first; then, for a name of more than eight
    labels, the name of its seven rightmost labels (so the walk never takes more than eight
    queries); then one label less each time, down to and including the top-level domain.
    """
    labels = domain.split(".")
    names = [domain]
    n = len(labels) - 1
    if len(labels) > MAX_TREEWALK_QUERIES:
        n = MAX_TREEWALK_QUERIES - 1
    while n >= 1:
        names.append(".".join(labels[-n:]))
        n -= 1
    return names


def _walk_org(resolver: DnsLookup, domain: str, known: Mapping[str, _Fetched] | None = None) -> str:
    """Tree-walk for the organizational domain of ``domain`` (``known``: names already fetched).

    RFC 9989 "Identifying the Organizational Domain": walking up from ``domain``, the first
    valid record with ``psd=n`` names the organizational domain; the first with ``psd=y``
    (other than at ``domain`` itself) makes the name one label below it the organizational
    domain; otherwise it is the name with the fewest labels that has a valid record, and
    without any record, ``domain`` itself. A broken record or several records at a name are
    no valid record for this purpose.

    :raises DNSTempError: a lookup of the walk failed transiently.
    """
    labels = domain.split(".")
    highest: str | None = None
    for name in treewalk_names(domain):
        got = known.get(name) if known is not None else None
        if got is None:
            try:
                got = _fetch(resolver, name)
            except DNSPermError:
                got = _Fetched((), ())  # a malformed answer holds no valid record
        if got.count != 1 or not got.records:
            continue
        record = got.records[0]
        if record.psd == "n":
            return name
        if record.psd == "y" and name != domain:
            return ".".join(labels[-(name.count(".") + 2) :])
        highest = name
    return highest or domain


def treewalk_org_domain(resolver: DnsLookup, domain: str) -> str:
    """Return the organizational domain of ``domain`` found by the DMARCbis tree walk.

    :raises DNSTempError: a lookup of the walk failed transiently.
    """
    return _walk_org(resolver, domain)


def org_domain_finder(method: str, psl_path: str | None,
                      resolver: DnsLookup) -> Callable[[str], str]:  # fmt: skip
    """The organizational domain of a name by ``OrganizationalDomainMethod`` (``psl``: the
    public suffix list at ``psl_path`` or the packaged one; ``treewalk``: the DMARCbis tree
    walk over ``resolver``), for the code that needs it outside one message's evaluation
    (report destinations, DKIM ordering in reports).

    :raises ConfigError: the PSL file cannot be read.
    """
    if method == OrgDomainMethod.TREEWALK.value:
        return lambda domain: treewalk_org_domain(resolver, domain)
    return PublicSuffix(psl_path).org_domain


def domain_exists(resolver: DnsLookup, domain: str) -> bool:
    """Whether ``domain`` exists in the DMARCbis sense.

    RFC 9989 "Non-existent Domains" (from RFC 9091 §2.7): a domain for which there is an
    NXDOMAIN or NODATA response for A, AAAA and MX records. NXDOMAIN on the first query
    settles it (RFC 8020: nothing exists there); any record settles it the other way.
    A malformed answer counts as existing (non-existence is not shown).

    :raises DNSTempError: a lookup failed transiently: existence is unknown.
    """
    for rdtype in ("A", "AAAA", "MX"):
        try:
            if resolver.query(domain, rdtype):
                return True
        except DNSNameNotFound:
            return False
        except DNSPermError:
            return True
    return False


def _describe(name: str, from_domain: str, org: str | None) -> str:
    where = f"record found at _dmarc.{name}"
    if name == from_domain:
        return f"{where} (the From domain itself)"
    if name == org:
        return f"{where} (organizational domain of {from_domain})"
    return f"{where} (a parent of {from_domain}; organizational domain {org})"


def _needs_existence(record: DmarcRecord, record_domain: str, from_domain: str) -> bool:
    """Whether np= could change the policy: a subdomain, np= set and different from sp/p."""
    if record_domain == from_domain or record.np is None:
        return False
    return record.np != (record.sp or record.p)


def discover(
    resolver: DnsLookup,
    from_domain: str,
    *,
    method: OrgDomainMethod,
    psl: PublicSuffix,
    check_exists: bool = True,
) -> Discovery:
    """Find the DMARC policy record that applies to ``from_domain``.

    PSL method, RFC 7489 §6.6.3: ``_dmarc.<From domain>``; when that holds no DMARC record,
    ``_dmarc.<organizational domain>`` if different. Tree walk, RFC 9989 "DNS Tree Walk":
    from the From domain upwards, at most eight queries, the first name with a record wins; the
    walk goes on to determine the organizational domain (see :func:`treewalk_org_domain`).

    Several DMARC records at the name where the search stops mean no policy (RFC 7489 §6.6.3
    step 5; applied to the tree walk as well): ``record=None``, no error. A broken record
    there is PERMERROR (conventions #7), a temporary DNS failure TEMPERROR, a malformed DNS
    answer PERMERROR. Non-DMARC TXT records are ignored.

    With ``check_exists`` the From domain's existence is looked up (A/AAAA/MX) only when
    ``np=`` could decide the policy (see :func:`domain_exists`); a temporary failure of that
    is TEMPERROR. :func:`evaluate` passes ``False`` and asks only for failing messages.

    Never raises for DNS trouble; ``from_domain`` that is no valid domain gives PERMERROR.
    """
    try:
        domain = normalize_domain(from_domain)
    except ValueError as exc:
        return Discovery(None, None, None, DmarcResult.PERMERROR, f"invalid domain: {exc}", None)
    if method is OrgDomainMethod.TREEWALK:
        found = _discover_treewalk(resolver, domain)
    else:
        found = _discover_psl(resolver, domain, psl)
    if (
        check_exists
        and found.record is not None
        and found.record_domain is not None
        and _needs_existence(found.record, found.record_domain, domain)
    ):
        try:
            exists = domain_exists(resolver, domain)
        except DNSTempError as exc:
            return Discovery(
                found.record,
                found.record_domain,
                found.org_domain,
                DmarcResult.TEMPERROR,
                f"existence of {domain} unknown: {exc}",
                None,
            )
        detail = found.detail + ("" if exists else f"; {domain} does not exist")
        return Discovery(found.record, found.record_domain, found.org_domain, None, detail, exists)
    return found


def _lookup_error(exc: DNSTempError | DNSPermError, name: str, org: str | None) -> Discovery:
    result = DmarcResult.TEMPERROR if isinstance(exc, DNSTempError) else DmarcResult.PERMERROR
    return Discovery(None, name, org, result, f"DNS lookup failed: {exc}", None)


def _from_fetched(got: _Fetched, name: str, from_domain: str, org: str | None) -> Discovery | None:
    """The discovery decided at ``name``, or ``None`` when it holds no DMARC record."""
    if got.count > 1:
        # RFC 7489 §6.6.3 step 5: several records: "DMARC processing is not applied".
        return Discovery(
            None,
            None,
            org,
            None,
            f"{got.count} DMARC records at _dmarc.{name}: none applies (RFC 7489 §6.6.3)",
            None,
        )
    if got.broken:
        return Discovery(
            None,
            name,
            org,
            DmarcResult.PERMERROR,
            f"broken DMARC record at _dmarc.{name}: {got.broken[0]}",
            None,
        )
    if got.records:
        return Discovery(got.records[0], name, org, None, _describe(name, from_domain, org), None)
    return None


def _discover_psl(resolver: DnsLookup, domain: str, psl: PublicSuffix) -> Discovery:
    org = psl.org_domain(domain)
    names = [domain] if org == domain else [domain, org]
    for name in names:
        try:
            got = _fetch(resolver, name)
        except (DNSTempError, DNSPermError) as exc:
            return _lookup_error(exc, name, org)
        decided = _from_fetched(got, name, domain, org)
        if decided is not None:
            return decided
    looked = " and ".join(f"_dmarc.{n}" for n in names)
    return Discovery(None, None, org, None, f"no DMARC record at {looked}", None)


def _discover_treewalk(resolver: DnsLookup, domain: str) -> Discovery:
    policy: Discovery | None = None
    names = treewalk_names(domain)
    known: dict[str, _Fetched] = {}
    for name in names:
        try:
            got = known[name] = _fetch(resolver, name)
        except (DNSTempError, DNSPermError) as exc:
            return _lookup_error(exc, name, None)
        policy = _from_fetched(got, name, domain, None)
        if policy is not None:
            break
    else:
        # No record anywhere: RFC 9989, the organizational domain is the domain itself.
        looked = f"_dmarc.{names[0]}" + (f" … _dmarc.{names[-1]}" if len(names) > 1 else "")
        return Discovery(
            None,
            None,
            domain,
            None,
            f"no DMARC record in a tree walk of {len(names)} names ({looked})",
            None,
        )
    assert policy is not None  # the loop broke on it
    if policy.error is not None or policy.record is None:
        return policy
    # The walk goes on above the record's name to find the organizational domain; what the
    # policy walk fetched is not asked again.
    try:
        org = _walk_org(resolver, domain, known)
    except DNSTempError as exc:
        return _lookup_error(exc, policy.record_domain or domain, None)
    assert policy.record_domain is not None
    return Discovery(
        policy.record,
        policy.record_domain,
        org,
        None,
        _describe(policy.record_domain, domain, org),
        None,
    )


# =============================================================================================
# 4. Evaluation
# =============================================================================================

_LESS_STRICT = {
    DmarcPolicy.REJECT: DmarcPolicy.QUARANTINE,
    DmarcPolicy.QUARANTINE: DmarcPolicy.NONE,
    DmarcPolicy.NONE: DmarcPolicy.NONE,
}


class _Orgs:
    """Organizational domains for alignment, computed on demand (tree walks cost DNS)."""

    def __init__(
        self, resolver: DnsLookup, method: OrgDomainMethod, psl: PublicSuffix, from_org: str
    ) -> None:
        self.resolver = resolver
        self.method = method
        self.psl = psl
        self.from_org = from_org
        self.temp_errors: list[str] = []

    def same_org(self, domain: str) -> bool | None:
        """Whether ``domain`` has the From domain's organizational domain; None if unknown."""
        # An organizational domain is always the domain or one of its parents, so a domain
        # outside the From's organizational domain cannot share it: no lookup needed.
        if domain != self.from_org and not domain.endswith("." + self.from_org):
            return False
        if self.method is OrgDomainMethod.PSL:
            return self.psl.org_domain(domain) == self.from_org
        try:
            return treewalk_org_domain(self.resolver, domain) == self.from_org
        except DNSTempError as exc:
            self.temp_errors.append(str(exc))
            return None


def _aligned(domain: str | None, from_domain: str, mode: str, orgs: _Orgs) -> bool | None:
    """RFC 7489 §3.1: strict = the same domain, relaxed = the same organizational domain."""
    if not domain:
        return False
    try:
        name = normalize_domain(domain)
    except ValueError:
        return False
    if name == from_domain:
        return True
    if mode == "s":
        return False
    return orgs.same_org(name)


def _select_policy(
    record: DmarcRecord, record_domain: str, from_domain: str, *, exists: bool
) -> str:
    """Name the tag whose policy applies: ``p``, ``sp`` or ``np``."""
    if record_domain == from_domain:
        return "p"  # RFC 7489 §6.6.3: the record is the From domain's own
    if not exists and record.np is not None:
        return "np"  # RFC 9989 "np" tag: non-existent subdomains
    return "sp" if record.sp is not None else "p"  # RFC 7489 §6.3 sp, default p


def evaluate(
    resolver: DnsLookup,
    author: AuthorDomain,
    dkim: Sequence[DkimOutcome],
    spf: SpfOutcome | None,
    *,
    method: OrgDomainMethod,
    psl: PublicSuffix,
    rand: Callable[[], float] = random.random,
    null_sender: bool = False,
) -> DmarcOutcome:
    """Evaluate DMARC for a message: result, applied policy and disposition.

    - Author: anything but ``FromStatus.OK`` is ``permerror`` (RFC 7489 §6.6.1 leaves such
      messages out of scope; the message breaks RFC 5322 §3.6 and DMARC cannot be evaluated
      permanently); it is never ``pass``. Which of these to reject is the caller's
      (``RequiredHeaders``, ``RejectMultiValueFrom``).
    - DKIM: any passing signature whose ``d=`` aligns (RFC 7489 §3.1.1).
    - SPF: only a pass for the MAIL FROM identity counts (RFC 7489 §4.1: DMARC uses the SPF
      result of the MAIL FROM identity). For the null sender that identity is
      ``postmaster@<HELO>`` (RFC 7208 §2.4), which ``spf_check`` reports with the HELO
      identity: pass ``null_sender=True`` for a message with an empty reverse-path and a HELO
      outcome then counts. Otherwise a HELO-identity pass does not count (a HELO check done
      for a non-null sender says nothing about the MAIL FROM domain).
    - Result: pass when either aligns; fail when a record exists and neither does; none without
      a record; temperror/permerror from discovery (or when an organizational-domain lookup
      needed for relaxed alignment fails transiently and nothing else aligns).
    - Policy: ``p`` when the record is the From domain's; for a subdomain ``np`` when the From
      domain does not exist (looked up only for failing messages), else ``sp``, else ``p``.
    - Disposition on fail: the policy, one step less strict (reject→quarantine→none) when the
      record has ``t=y`` (RFC 9989) or the message is sampled out by ``pct`` (RFC 7489 §6.6.4:
      ``rand() >= pct/100``; ``rand`` is not called for pct=100 or under t=y). The two do not
      add up: t=y is DMARCbis's replacement for pct=0. ``none`` for every other result.
    """
    if author.status is not FromStatus.OK or author.domain is None:
        return DmarcOutcome(
            result=DmarcResult.PERMERROR,
            reason=f"no single author domain ({author.status.value}): {author.detail}",
        )
    from_domain = author.domain
    # The same From domain finds the same record while the DNS answers it read are fresh.
    found = memoized(resolver, ("dmarc", from_domain, method, psl.path),
                     lambda: discover(resolver, from_domain, method=method, psl=psl,
                                      check_exists=False),
                     keep=lambda d: d.error is not DmarcResult.TEMPERROR)  # fmt: skip
    org = found.org_domain
    if found.error is not None:
        return DmarcOutcome(
            result=found.error,
            from_domain=from_domain,
            record_domain=found.record_domain,
            org_domain=org,
            reason=found.detail,
        )
    record = found.record
    if record is None or found.record_domain is None:
        return DmarcOutcome(
            result=DmarcResult.NONE, from_domain=from_domain, org_domain=org, reason=found.detail
        )
    record_domain = found.record_domain
    orgs = _Orgs(resolver, method, psl, org or from_domain)

    passed = [sig for sig in dkim if sig.passed]
    dkim_states = [_aligned(sig.domain, from_domain, record.adkim, orgs) for sig in passed]
    aligned_d = next((s.domain for s, ok in zip(passed, dkim_states, strict=True) if ok), None)
    spf_state: bool | None = False
    if (
        spf is not None
        and spf.result is SpfResult.PASS
        and (spf.identity is SpfIdentity.MAILFROM or null_sender)
    ):
        spf_state = _aligned(spf.domain, from_domain, record.aspf, orgs)
    base = DmarcOutcome(
        result=DmarcResult.FAIL,
        from_domain=from_domain,
        record_domain=record_domain,
        org_domain=org,
        dkim_aligned=aligned_d is not None,
        spf_aligned=spf_state is True,
        testing=record.testing,
        record=record,
    )

    if base.dkim_aligned or base.spf_aligned:
        via = [f"DKIM d={aligned_d}"] if base.dkim_aligned else []
        if base.spf_aligned and spf is not None:
            via.append(f"SPF {spf.domain}")
        tag = _select_policy(record, record_domain, from_domain, exists=True)
        return replace(
            base,
            result=DmarcResult.PASS,
            policy=_policy_of(record, tag),
            reason=f"aligned {' and '.join(via)}",
        )
    # An identifier that would align but could not be checked for a transient DNS reason
    # (RFC 6376 §6.1.2 key lookup, RFC 7208 §2.6.6): a later try may pass, so the result is
    # temperror (RFC 7489 §11.2), never a fail that a p=reject would turn into a bounce.
    unknown = [f"DKIM d={sig.domain}" for sig in dkim
               if sig.result is DkimResult.TEMPERROR
               and _aligned(sig.domain, from_domain, record.adkim, orgs) is True]  # fmt: skip
    if (spf is not None and spf.result is SpfResult.TEMPERROR
            and (spf.identity is SpfIdentity.MAILFROM or null_sender)
            and _aligned(spf.domain, from_domain, record.aspf, orgs) is True):  # fmt: skip
        unknown.append(f"SPF {spf.domain}")
    # The policy a failure would get, where no further lookup is needed to know it: a p=none
    # domain's temperror is never worth deferring mail for.
    known = _known_policy(record, record_domain, from_domain)
    if unknown:
        return replace(
            base,
            result=DmarcResult.TEMPERROR,
            policy=known,
            reason=f"alignment unknown: {' and '.join(unknown)} had a temporary error",
        )
    if orgs.temp_errors:
        return replace(
            base,
            result=DmarcResult.TEMPERROR,
            policy=known,
            reason=f"alignment unknown: {orgs.temp_errors[0]}",
        )

    exists = True
    if _needs_existence(record, record_domain, from_domain):
        try:
            exists = domain_exists(resolver, from_domain)
        except DNSTempError as exc:
            return replace(
                base,
                result=DmarcResult.TEMPERROR,
                reason=f"existence of {from_domain} unknown: {exc}",
            )
    tag = _select_policy(record, record_domain, from_domain, exists=exists)
    policy = _policy_of(record, tag)
    disposition = policy
    sampled_out = False
    notes = [f"{tag}={policy.value}"]
    if not exists and tag == "np":
        notes.append(f"{from_domain} does not exist")
    if record.testing:
        disposition = _LESS_STRICT[policy]  # RFC 9989 "t" tag
        notes.append("t=y")
    elif record.pct < 100 and policy is not DmarcPolicy.NONE and rand() >= record.pct / 100:
        sampled_out = True  # RFC 7489 §6.6.4
        disposition = _LESS_STRICT[policy]
        notes.append(f"sampled out by pct={record.pct}")
    return replace(
        base,
        policy=policy,
        disposition=disposition,
        sampled_out=sampled_out,
        reason=f"no aligned DKIM or SPF identifier ({', '.join(notes)})",
    )


def _known_policy(record: DmarcRecord, record_domain: str,
                  from_domain: str) -> DmarcPolicy | None:  # fmt: skip
    """The policy a failure would get, when every tag that could apply says the same."""
    if from_domain == record_domain:
        candidates = {record.p, _policy_of(record, "np") if record.np is not None else record.p}
    else:
        candidates = {_policy_of(record, "sp"), _policy_of(record, "np")}
    return candidates.pop() if len(candidates) == 1 else None


def _policy_of(record: DmarcRecord, tag: str) -> DmarcPolicy:
    if tag == "np" and record.np is not None:
        return record.np
    if tag in ("np", "sp") and record.sp is not None:
        return record.sp
    return record.p
