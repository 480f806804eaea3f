"""Authentication-Results (RFC 8601): the one place that writes its text, and reads others'.

We write one field per message with every method's result; we remove incoming fields that claim
our authserv-id (or one listed in ``RemoveARFrom``), whatever methods they carry (RFC 8601 §5).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import authres
import authres.arc
import authres.dmarc
from authres.core import AuthenticationResultProperty, QuotableValue

from authmilter.arc_verify import ArcOutcome
from authmilter.results import (
    DkimOutcome,
    DkimResult,
    DmarcOutcome,
    DmarcResult,
    SpfIdentity,
    SpfOutcome,
)

HEADER = "Authentication-Results"
#: How much of b= identifies a signature in header.b (RFC 6008 §2: at least 8 characters).
HEADER_B_LENGTH = 8


def dkim_comment(outcome: DkimOutcome) -> str | None:
    """OpenDKIM's comment shape: ``2048-bit key`` plus the reason of a non-pass."""
    parts = []
    if outcome.key_bits:
        parts.append(f"{outcome.key_bits}-bit key")
    if outcome.testing:
        parts.append("test mode")
    if outcome.result is not DkimResult.PASS and outcome.reason:
        parts.append(outcome.reason)
    return "; ".join(parts) if parts else None


def _dkim_clause(outcome: DkimOutcome, *, header_b: bool) -> authres.DKIMAuthenticationResult:
    clause = authres.DKIMAuthenticationResult(
        result=outcome.result.value,
        result_comment=_comment_safe(dkim_comment(outcome)),
        header_d=outcome.domain,
        header_i=_pvalue(outcome.identity),
        header_a=outcome.algorithm,
        header_s=outcome.selector,
    )
    if header_b and outcome.b:
        clause.properties.append(
            AuthenticationResultProperty("header", "b", outcome.b[:HEADER_B_LENGTH]))
    return clause


# RFC 8601 §2.2 pvalue = [CFWS] ( value / [ [ local-part ] "@" ] domain-name ) [CFWS].
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_ADDRESS_PVALUE = re.compile(rf"(?:{_DOT_ATOM}|{_QUOTED_STRING})?@{_DOT_ATOM}")


_UNSENDABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def _quoted(text: str) -> str:
    return '"' + re.sub(r'(["\\])', r"\\\1", re.sub(r"[\x00-\x1f\x7f]", "", text)) + '"'


def _pvalue(text: str | None) -> str | None:
    """A property value that reads back as one value (RFC 8601 §2.2 pvalue).

    authres writes any value holding ``@`` as it is. A sender or ``i=`` from outside can hold
    ``(``, ``;``, white space or 8-bit text in its local part: written bare, that breaks the
    field, or opens a comment that hides every clause after it (the dmarc= one included).
    Such a local part (or the whole value, when the domain is odd too) is quoted.
    """
    if text is None:
        return None
    # Undecodable client bytes arrive as lone surrogates (pymilter's surrogateescape) and
    # pymilter hands libmilter UTF-8: they, and control characters, become "?".
    text = _UNSENDABLE.sub("?", text)
    if "@" not in text or _ADDRESS_PVALUE.fullmatch(text):
        return text
    local, _, domain = text.rpartition("@")
    if re.fullmatch(_DOT_ATOM, domain):
        return f"{_quoted(local)}@{domain}" if local else f"@{domain}"
    return _quoted(text)


def _comment_safe(text: str | None) -> str | None:
    """A comment must not unbalance the field, and stays ASCII: parentheses, backslashes and
    control characters (line breaks, NUL) are dropped, "§" is spelled out, anything else
    non-ASCII becomes "?"."""
    if text is None:
        return None
    text = re.sub(r"[()\\\x00-\x1f\x7f]", "", text).replace("§", "section ")
    return text.encode("ascii", "replace").decode("ascii")


def _spf_clause(outcome: SpfOutcome) -> authres.SPFAuthenticationResult:
    """``spf=pass (comment) smtp.mailfrom=…``, or ``smtp.helo=…`` for the HELO identity."""
    helo = outcome.identity is SpfIdentity.HELO
    return authres.SPFAuthenticationResult(
        result=outcome.result.value,
        result_comment=_comment_safe(outcome.comment),
        smtp_mailfrom=None if helo else _pvalue(outcome.sender),
        smtp_helo=_pvalue(outcome.helo or outcome.domain) if helo else None,
    )


def _dmarc_clause(outcome: DmarcOutcome,
                  note: str | None = None) -> authres.dmarc.DMARCAuthenticationResult:  # fmt: skip
    """OpenDMARC's shape: ``dmarc=fail (p=reject dis=quarantine) header.from=… policy.dmarc=…``;
    ``note`` is added to the comment after ``;``."""
    comment = None
    if outcome.policy is not None:
        comment = f"p={outcome.policy.value} dis={outcome.disposition.value}"
    elif outcome.result is DmarcResult.NONE and outcome.from_domain:
        comment = "p=none dis=none"  # OpenDMARC's comment for a domain without a record
    if note:
        comment = f"{comment}; {note}" if comment else note
    return authres.dmarc.DMARCAuthenticationResult(
        result=outcome.result.value,
        result_comment=_comment_safe(comment),
        header_from=outcome.from_domain,
        policy=outcome.policy.value if outcome.policy is not None else None,
    )


def _arc_clause(outcome: ArcOutcome, remote_ip: str | None) -> authres.arc.ARCAuthenticationResult:
    """RFC 8617 §10.2: ``arc=pass (as[2].d=… as[2].s=…) header.oldest-pass=0
    smtp.remote-ip=…``; a fail says why in the comment."""
    if outcome.passed and outcome.sets:
        newest = outcome.sets[-1]
        comment = (f"i={newest.instance} as[{newest.instance}].d={newest.domain} "
                   f"as[{newest.instance}].s={newest.selector}")  # fmt: skip
    else:
        comment = outcome.reason
    oldest = outcome.oldest_pass if outcome.passed else None
    return authres.arc.ARCAuthenticationResult(
        result=outcome.result,
        result_comment=_comment_safe(comment),
        # authres leaves out a falsy value: 0 ("every AMS validates") is written as text
        header_oldest_pass=str(oldest) if oldest is not None else None,
        smtp_remote_ip=remote_ip,
    )


def build(authserv_id: str, *, dkim: Sequence[DkimOutcome] = (), spf: SpfOutcome | None = None,
          dmarc: DmarcOutcome | None = None, arc: ArcOutcome | None = None,
          remote_ip: str | None = None, header_b: bool = True,
          dmarc_note: str | None = None) -> str:  # fmt: skip
    """The value of our Authentication-Results field (without the field name): DKIM clauses,
    then SPF, then ARC (when the message has ARC fields), then DMARC, as OpenDKIM and OpenDMARC
    order theirs.

    ``header_b=False`` implements OpenDKIM's ``NoHeaderB``; ``remote_ip`` is the client, the
    ARC clause's ``smtp.remote-ip``; ``dmarc_note`` goes into the DMARC clause's comment
    (a trusted ARC sealer's override).
    """
    results = [str(_dkim_clause(o, header_b=header_b)) for o in dkim]
    if spf is not None:
        results.append(str(_spf_clause(spf)))
    if arc is not None:
        results.append(str(_arc_clause(arc, remote_ip)))
    if dmarc is not None:
        results.append(str(_dmarc_clause(dmarc, dmarc_note)))
    # authres would lower-case the authserv-id and not quote it; keep it as given, quoted when
    # it is not a token (AuthservIDWithJobID adds "/queue-id").
    aid = QuotableValue(authserv_id).quote_if_needed()
    return f"{aid}; {'; '.join(results)}" if results else f"{aid}; none"


# -- reading incoming fields --------------------------------------------------------------------


def _lenient_authserv_id(value: str) -> str:
    """The authserv-id as a forgiving reader would take it: before ``;``, comments dropped.

    An unbalanced ``(`` comments out the rest, as a comment-aware reader would see it.
    """
    head = value.split(";", 1)[0]
    out, depth = [], 0
    for ch in head:
        if ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(ch)
    tokens = "".join(out).split()
    token = tokens[0] if tokens else ""
    if token.startswith('"'):
        # An RFC 2045 quoted-string means its content: "exa\\mple.net" is example.net.
        token = re.sub(r"\\(.)", r"\1", token.strip('"'))
    return token.lower()


def authserv_id_of(value: str) -> str | None:
    """The authserv-id of an Authentication-Results value, or None if it does not parse."""
    try:
        parsed = authres.AuthenticationResultsHeader.parse_value(value)
    except Exception:  # noqa: BLE001 - authres raises its own and builtin errors on junk
        return None
    aid = parsed.authserv_id
    return str(aid).lower() if aid else None


def _matches(authserv_id: str, ours: Iterable[str]) -> bool:
    for name in ours:
        name = name.lower()
        if name.startswith("."):
            if authserv_id.endswith(name):
                return True
        elif authserv_id == name or authserv_id.startswith(name + "/"):
            # "<id>/<queue id>" is how AuthservIDWithJobID writes our id: that claims it too.
            return True
    return False


def claims(value: str, ours: Sequence[str]) -> bool:
    """Whether an incoming Authentication-Results value claims one of ``ours`` as its
    authserv-id (RFC 8601 §5: such a field from outside is a forgery and must go).

    ``ours`` holds our authserv-id and the ``RemoveARFrom`` entries (``host`` or ``.domain``).
    A value that does not parse is judged by a lenient reading, and is also removed when its
    authserv-id part merely mentions one of our names: a field nobody can parse reliably
    that names us is never left for a downstream reader to misread.
    """
    parsed = authserv_id_of(value)
    if parsed is not None:
        return _matches(parsed, ours)
    if _matches(_lenient_authserv_id(value), ours):
        return True
    head = value.split(";", 1)[0].lower()
    return any(name.lower().lstrip(".") in head for name in ours if name.strip("."))


@dataclass(frozen=True, slots=True)
class Upstream:
    """Results that a trusted border host wrote (OpenDMARC's ``TrustedAuthservIDs``)."""

    spf_result: str | None = None
    spf_mailfrom: str | None = None
    dkim_pass_domains: tuple[str, ...] = ()


def trusted_upstream(values: Iterable[str], trusted: Sequence[str]) -> Upstream:
    """Collect the SPF result and passing DKIM domains from fields whose authserv-id is in
    ``trusted``. Fields that do not parse are ignored; the first SPF result wins (the field
    nearest the top was written last, by the host nearest to us)."""
    wanted = {t.lower() for t in trusted}
    spf_result = spf_mailfrom = None
    dkim: list[str] = []
    for value in values:
        try:
            parsed = authres.AuthenticationResultsHeader.parse_value(value)
        except Exception:  # noqa: BLE001 - a field we cannot read is no evidence
            continue
        if str(parsed.authserv_id or "").lower() not in wanted:
            continue
        for r in parsed.results:
            if r.method == "spf" and spf_result is None:
                mailfrom = getattr(r, "smtp_mailfrom", None)
                if mailfrom:
                    spf_result, spf_mailfrom = str(r.result), str(mailfrom)
            elif r.method == "dkim" and r.result == "pass":
                d = getattr(r, "header_d", None)
                if d:
                    dkim.append(str(d).lower())
    return Upstream(spf_result, spf_mailfrom, tuple(dict.fromkeys(dkim)))


def result_of(value: str, method: str) -> str | None:
    """The result of the first ``method`` clause (``arc``, ``dmarc`` …) of an
    Authentication-Results value, lower-case; ``None`` when absent or unparseable."""
    try:
        parsed = authres.AuthenticationResultsHeader.parse_value(value)
    except Exception:  # noqa: BLE001 - authres raises its own and builtin errors on junk
        return None
    for r in parsed.results:
        if str(r.method).lower() == method:
            return str(r.result).lower()
    return None
