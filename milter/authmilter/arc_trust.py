"""Trusted ARC sealers rescue DMARC: which ARC-Authentication-Results may override a fail.

A mailing list or forwarder breaks SPF (new client address) and often DKIM (subject tag,
footer), so the author's DMARC fails at the next hop although the mail was genuine when the
intermediary received it. ARC (RFC 8617) lets that intermediary record what it saw in an
ARC-Authentication-Results (AAR) and seal it. RFC 8617 §7.2.1 leaves it to the receiver
which sealers to believe; the user names them (``ARCTrustedSealers``), and this module
decides, without I/O, whether one of their AARs turns a DMARC ``fail`` into a pass:

- the chain validates (``arc=pass``): only then is every AAR known to be what its sealer
  wrote, untouched by the hops after it;
- walking from the newest instance N down, every sealer (the ARC-Seal's ``d=``) down to and
  including the instance whose AAR is used is trusted. An untrusted sealer stops the walk:
  it could have written every set below itself (the seals only prove who added each set, and
  an untrusted hop can build a whole fake chain under its own seal), so nothing below it is
  evidence;
- that AAR's SPF and DKIM results make DMARC pass for the From domain. The caller's
  ``passes`` callback does that evaluation (it wraps :func:`authmilter.dmarc.evaluate`), so
  alignment, ``adkim``/``aspf`` and the organizational domain follow the same rules as for
  our own results. The AAR's own ``dmarc=`` clause is never believed: it was evaluated for
  whatever policy the sealer had cached, and it is cheap to recompute.

The newest usable instance wins. ``header.oldest-pass`` is not consulted: an AMS below it
failing only says the message changed after that hop, and every hop after it is trusted by
the time its AAR is read.

**Reading AARs.** An AAR is ``i=<instance>;`` and then an Authentication-Results payload
(RFC 8617 §4.1.1). The ``i=`` is read with the verifier's rule (:mod:`authmilter.arc_verify`:
lower-case ``i``, 1..50, first in the field), so both agree on which instance a field
belongs to. The payload goes to ``authres`` first, the parser
:mod:`authmilter.authresults` already trusts; it reads the Microsoft 365 shape
(``mx.microsoft.com 1;``: an authres-version after the authserv-id, unknown ptypes such as
``smtp.rcpttodomain``, the non-RFC ``action=none``) and Gmail's. When it raises, a small
tolerant reader of our own (:func:`_read_lenient`) takes over, because authres refuses
payloads real sealers write or that a trusted sealer's AAR may still carry:

- no authserv-id (some sealers start with ``spf=pass …`` right after ``i=N;``): authres
  requires one and fails the whole field;
- a version other than ``1``, a NUL or non-ASCII byte, an unbalanced parenthesis, a
  character authres does not expect anywhere: authres fails the whole field, where one
  broken clause should cost only that clause;
- deeply nested comments: authres recurses per level and raises ``RecursionError``; values
  nested deeper than :data:`_AUTHRES_MAX_DEPTH` skip authres altogether.

The tolerant reader strips comments (nested, with escapes; an unclosed one runs to the end,
as a comment-aware reader sees it), splits at ``;`` outside quoted strings and comments,
and reads ``method[/version]=result`` then ``ptype.property=value`` pairs; anything else
(``reason=``, ``action=``, junk) is skipped, a quoted string as one unit so text inside
quotes is never read as a property. Tests check both readers agree where authres reads.

What is taken from an AAR:

- DKIM: only ``dkim=pass``; the domain from ``header.d``, else from the part of
  ``header.i`` after ``@``; the selector from ``header.s``. A clause whose domain is not a
  DNS name (U-labels included: a DKIM ``d=`` is ASCII) is skipped.
- SPF: the first ``spf=<result>`` clause with a readable result and ``smtp.mailfrom``
  (``local@domain``, ``@domain`` or a bare domain, as Microsoft writes it), as a MAIL FROM
  identity result; a HELO-only clause is not one (DMARC uses MAIL FROM, RFC 7489 §4.1).
- ``smtp.remote-ip`` when it is a valid address.

Values longer than :data:`MAX_AAR_CHARS` yield the instance and no results: no honest
sealer writes that much, and it bounds the work per field. :func:`parse_aar` and
:func:`find_rescue` never raise on header content; exceptions raised by the caller's
``trusted`` and ``passes`` callbacks are the caller's and propagate.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import authres

from authmilter.arc_verify import MAX_INSTANCES, ArcOutcome, ArcSet
from authmilter.dkim_verify import DNS_NAME
from authmilter.results import DkimOutcome, DkimResult, SpfIdentity, SpfOutcome, SpfResult

__all__ = ["MAX_AAR_CHARS", "AarResults", "Rescue", "find_rescue", "parse_aar"]

#: Longer AAR values are not read beyond their instance (real ones are under 2 KiB).
MAX_AAR_CHARS: Final = 16_384
#: Comment nesting beyond this skips authres (it recurses once per level).
_AUTHRES_MAX_DEPTH: Final = 16
_AAR_NAME: Final = b"arc-authentication-results"
# The verifier's reading of RFC 8617 §4.1.1 "i=" instance ";" (arc_verify._AAR_INSTANCE).
_INSTANCE: Final = re.compile(r"[ \t\r\n]*i[ \t\r\n]*=[ \t\r\n]*([1-9][0-9]?)[ \t\r\n]*;")
_FOLD: Final = re.compile(r"\r?\n(?=[ \t])")
_METHOD: Final = re.compile(
    r"[ \t]*([A-Za-z0-9][A-Za-z0-9_.-]*)[ \t]*(?:/[ \t]*[0-9]+[ \t]*)?=[ \t]*"
    r"([A-Za-z0-9][A-Za-z0-9_.-]*)(?=[ \t\"]|\Z)"
)
_QUOTED: Final = r'"(?:[^"\\]|\\.)*(?:"|\Z)'
# One unit of a clause: a quoted string, a ptype.property=pvalue, or any other word.
_UNIT: Final = re.compile(
    rf"{_QUOTED}"
    r"|([A-Za-z0-9_-]+)[ \t]*\.[ \t]*([A-Za-z0-9_-][A-Za-z0-9_.-]*)[ \t]*=[ \t]*"
    rf"((?:{_QUOTED})(?:@[^\s\"]*)?|[^\s\"]*)"
    r"|[^\s\"]+",
    re.DOTALL,
)
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_ALGORITHM: Final = re.compile(r"[a-z0-9-]{1,32}")

# (method, result, [(ptype, property, value)]), method/result/ptype/property lower case.
_Clause = tuple[str, str, list[tuple[str, str, str]]]


@dataclass(frozen=True, slots=True)
class AarResults:
    """One ARC-Authentication-Results, read leniently (see the module docstring)."""

    instance: int
    authserv_id: str | None
    dkim: tuple[DkimOutcome, ...]
    spf: SpfOutcome | None
    remote_ip: str | None


@dataclass(frozen=True, slots=True)
class Rescue:
    """The AAR that made DMARC pass: its instance, its sealer, ``"dkim"`` or ``"spf"``, and
    the RFC 8617 §7.2.2 comment (every set newest first, the used instance's remote-ip)."""

    instance: int
    sealer: str
    method: str
    comment: str


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def parse_aar(value: str) -> AarResults | None:
    """Read one AAR value (``i=N; authserv-id [version]; method=result …``).

    Folding (CRLF before white space) is accepted. ``None`` when the value does not start
    with a valid ``i=`` (1..50); otherwise the results that could be read, possibly none.
    Never raises.
    """
    try:
        match = _INSTANCE.match(value)
        if match is None or int(match.group(1)) > MAX_INSTANCES:
            return None
        instance = int(match.group(1))
    except Exception:  # noqa: BLE001 - not a str, or worse: no instance
        return None
    empty = AarResults(instance, None, (), None, None)
    rest = value[match.end() :]
    if len(rest) > MAX_AAR_CHARS:
        return empty
    try:
        text = _FOLD.sub("", rest).replace("\r", " ").replace("\n", " ").strip()
        read = _read_authres(text)
        if read is None:
            read = _read_lenient(text)
        return _results(instance, *read)
    except Exception:  # noqa: BLE001 - hostile text: nothing is read, never an exception
        return empty


def find_rescue(
    arc: ArcOutcome,
    headers: list[tuple[bytes, bytes]],
    *,
    trusted: Callable[[str], bool],
    passes: Callable[[Sequence[DkimOutcome], SpfOutcome | None], str | None],
) -> Rescue | None:
    """The newest AAR of a trusted, unbroken run of sealers from the top that makes DMARC
    pass, or ``None`` (see the module docstring).

    :param arc: :func:`authmilter.arc_verify.verify_chain`'s verdict on ``headers``.
    :param headers: ``(name, value)`` as on the wire (folding and final CRLF kept).
    :param trusted: whether a sealer domain is trusted (the caller handles case).
    :param passes: DMARC for the message's From domain on these results: ``"dkim"`` or
        ``"spf"`` (the aligned result that passed) or ``None``; any other answer is no pass.
        It is called only for trusted instances whose AAR yields a result.

    An instance whose AAR is missing, doubled or yields nothing is skipped; the walk goes on
    below it only when its sealer is trusted. Never raises on header content.
    """
    if arc.result != "pass" or not arc.sets:
        return None
    aars = _aar_values(headers)
    sets = sorted(arc.sets, key=lambda s: s.instance, reverse=True)
    for arc_set in sets:
        if not trusted(arc_set.domain):
            return None
        values = aars.get(arc_set.instance, [])
        read = parse_aar(values[0]) if len(values) == 1 else None
        if read is None or read.instance != arc_set.instance:
            continue
        if not read.dkim and read.spf is None:
            continue
        method = passes(read.dkim, read.spf)
        if method is not None and method in ("dkim", "spf"):
            return Rescue(
                instance=arc_set.instance,
                sealer=arc_set.domain,
                method=method,
                comment=_comment(sets, arc_set, read.remote_ip or arc_set.remote_ip),
            )
    return None


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _aar_values(headers: list[tuple[bytes, bytes]]) -> dict[int, list[str]]:
    """Every AAR value by its instance; only the ``i=`` is read here (cheap), the results
    only for the instances the walk reaches."""
    out: dict[int, list[str]] = {}
    for name, value in headers:
        try:
            if name.lower() != _AAR_NAME:  # as the verifier matches names
                continue
            text = value.decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - not bytes: not a field we can read
            continue
        match = _INSTANCE.match(text)
        if match is not None:
            out.setdefault(int(match.group(1)), []).append(text)
    return out


def _read_authres(text: str) -> tuple[str | None, list[_Clause]] | None:
    """authres's reading, or ``None`` when it refuses the payload (or would recurse deep)."""
    if _comment_depth(text) > _AUTHRES_MAX_DEPTH:
        return None
    try:
        parsed = authres.AuthenticationResultsHeader.parse_value(text)
        clauses: list[_Clause] = []
        for result in parsed.results:
            props = [(str(p.type).lower(), str(p.name).lower(), str(p.value))
                     for p in result.properties]  # fmt: skip
            clauses.append((str(result.method).lower(), str(result.result).lower(), props))
        aid = str(parsed.authserv_id) if parsed.authserv_id else None
    except Exception:  # noqa: BLE001 - authres raises its own and builtin errors on junk
        return None
    return aid, clauses


def _comment_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")" and depth:
            depth -= 1
    return deepest


def _segments(text: str) -> list[str]:
    """Split at ``;`` outside quoted strings and comments; comments become one space."""
    segments: list[str] = []
    current: list[str] = []
    depth = 0
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
            if not depth:
                current.append(ch)
        elif ch == "\\" and (depth or quoted):
            escaped = True
            if not depth:
                current.append(ch)
        elif depth:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if not depth:
                    current.append(" ")
        elif quoted:
            current.append(ch)
            quoted = ch != '"'
        elif ch == "(":
            depth = 1
        elif ch == '"':
            quoted = True
            current.append(ch)
        elif ch == ";":
            segments.append("".join(current))
            current = []
        else:
            current.append(ch)
    segments.append("".join(current))
    return segments


def _read_lenient(text: str) -> tuple[str | None, list[_Clause]]:
    """The tolerant reader: ``(authserv-id or None, clauses)``."""
    segments = _segments(text)
    authserv_id = None
    if segments and _METHOD.match(segments[0]) is None:
        words = segments.pop(0).split()
        if words:
            authserv_id = _unquote(words[0]).lower()
    clauses: list[_Clause] = []
    for segment in segments:
        method = _METHOD.match(segment)
        if method is None:
            continue
        props = [(unit.group(1).lower(), unit.group(2).lower(), _unquote_pvalue(unit.group(3)))
                 for unit in _UNIT.finditer(segment, method.end())
                 if unit.group(1) is not None]  # fmt: skip
        clauses.append((method.group(1).lower(), method.group(2).lower(), props))
    return authserv_id, clauses


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1], flags=re.DOTALL)
    return text


def _unquote_pvalue(text: str) -> str:
    """A quoted pvalue means its content; ``"local"@domain`` stays as written (as authres)."""
    return _unquote(text) if re.fullmatch(_QUOTED, text, re.DOTALL) else text


# --------------------------------------------------------------------------------------------
# Interpreting
# --------------------------------------------------------------------------------------------


def _results(instance: int, authserv_id: str | None, clauses: list[_Clause]) -> AarResults:
    comment = f"ARC i={instance}"
    read = [(method, result, _first_of_each(props)) for method, result, props in clauses]
    ips = (_ip(props.get(("smtp", "remote-ip"))) for _method, _result, props in read)
    remote_ip = next((ip for ip in ips if ip is not None), None)
    dkim: list[DkimOutcome] = []
    spf: SpfOutcome | None = None
    for method, result, props in read:
        if method == "dkim" and result == "pass":
            outcome = _dkim(props, comment)
            if outcome is not None:
                dkim.append(outcome)
        elif method == "spf" and spf is None:
            spf = _spf(result, props.get(("smtp", "mailfrom")), remote_ip, comment)
    return AarResults(
        instance=instance,
        authserv_id=_printable(authserv_id),
        dkim=tuple(dict.fromkeys(dkim)),
        spf=spf,
        remote_ip=remote_ip,
    )


def _first_of_each(props: list[tuple[str, str, str]]) -> dict[tuple[str, str], str]:
    """``(ptype, property) -> value``; a repeated property counts as first written."""
    first: dict[tuple[str, str], str] = {}
    for ptype, prop, value in props:
        first.setdefault((ptype, prop), value)
    return first


def _dkim(props: dict[tuple[str, str], str], comment: str) -> DkimOutcome | None:
    identity = _printable(props.get(("header", "i")))
    domain = _domain(props.get(("header", "d")))
    if domain is None and identity is not None and "@" in identity:
        domain = _domain(identity.rpartition("@")[2])
    if domain is None:
        return None
    selector = props.get(("header", "s"))
    algorithm = (props.get(("header", "a")) or "").lower()
    return DkimOutcome(
        result=DkimResult.PASS,
        domain=domain,
        selector=selector if selector is not None and DNS_NAME.fullmatch(selector) else None,
        identity=identity,
        algorithm=algorithm if _ALGORITHM.fullmatch(algorithm) else None,
        reason=comment,
    )


def _spf(result: str, mailfrom: str | None, remote_ip: str | None,
         comment: str) -> SpfOutcome | None:  # fmt: skip
    sender = _printable(mailfrom)
    if sender is None:
        return None
    try:
        spf_result = SpfResult(result)
    except ValueError:
        return None
    domain = _domain(sender.rpartition("@")[2])
    if domain is None:
        return None
    return SpfOutcome(result=spf_result, identity=SpfIdentity.MAILFROM, sender=sender,
                      domain=domain, client_ip=remote_ip or "", comment=comment)  # fmt: skip


def _domain(value: str | None) -> str | None:
    if value is None:
        return None
    domain = value.strip().rstrip(".").lower()
    return domain if DNS_NAME.fullmatch(domain) else None


def _ip(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


def _printable(value: str | None) -> str | None:
    """A value fit for logs and reports: non-empty, no control characters, not huge."""
    if not value or len(value) > 320 or _CONTROL.search(value):
        return None
    return value


def _comment(sets: Sequence[ArcSet], used: ArcSet, remote_ip: str | None) -> str:
    parts = ["arc=pass"]
    parts += [f"as[{s.instance}].d={s.domain} as[{s.instance}].s={s.selector}" for s in sets]
    if remote_ip:
        parts.append(f"remote-ip[{used.instance}]={remote_ip}")
    return " ".join(parts)
