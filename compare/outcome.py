"""What each side did with a message, read back from the SMTP replies and delivered headers.

For the anchors that is OpenDKIM's and OpenDMARC's Authentication-Results fields and
policyd-spf's Received-SPF; for authmilter its one Authentication-Results field (and its
Received-SPF, when a policyd-spf file asks for one). The fields compared per message are
:data:`FIELDS`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import authres
import authres.dmarc
import dkim

#: The compared fields, in table order.
FIELDS = ("smtp", "dkim", "spf", "spf-ar", "dmarc", "policy", "signature")

_HEADER = re.compile(rb"^([!-9;-~]+):[ \t]*(.*?)\r?$", re.S)


def header_fields(raw: bytes) -> list[tuple[str, str]]:
    """The header section of ``raw`` as (name, unfolded value) pairs, in order."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    fields: list[tuple[str, str]] = []
    for chunk in re.split(rb"\r\n(?![ \t])", head):
        m = _HEADER.match(chunk)
        if not m:
            continue
        value = re.sub(rb"\r\n([ \t])", rb"\1", m[2]).decode("utf-8", "replace")
        fields.append((m[1].decode("ascii"), value))
    return fields


def added_fields(original: bytes, delivered: bytes) -> list[tuple[str, str]]:
    """Header fields in ``delivered`` that ``original`` did not have (milters', Postfix's)."""
    have = Counter((n.lower(), v) for n, v in header_fields(original))
    added = []
    for name, value in header_fields(delivered):
        key = (name.lower(), value)
        if have[key] > 0:
            have[key] -= 1
        else:
            added.append((name, value))
    return added


@dataclass
class Outcome:
    """One side's result for one message; ``values`` maps each of :data:`FIELDS` to text."""

    values: dict[str, str] = field(default_factory=dict)
    #: the header fields the milters (and policyd-spf) added, exactly as delivered
    headers: list[str] = field(default_factory=list)
    reply: str = ""
    problems: list[str] = field(default_factory=list)


def smtp_value(kind: str, stage: str | None = None, code: int | None = None) -> str:
    """``accepted``, ``held`` (hold queue), ``5xx@rcpt``, ``4xx@data``, ``lost@data``."""
    if kind in ("accepted", "held", "not delivered"):
        return kind
    if code is not None:
        return f"{code // 100}xx@{stage}"
    return f"{kind}@{stage}"


def _comment_tags(comment: str | None) -> dict[str, str]:
    return dict(re.findall(r"\b(p|dis|sp)=(\w+)", comment or ""))


def parse_results(added: list[tuple[str, str]], *, dnsfunc: Callable[..., bytes],
                  delivered: bytes) -> Outcome:  # fmt: skip
    """Read dkim/spf/dmarc results (and added DKIM signatures) from the added fields."""
    out = Outcome()
    dkim_results: list[str] = []
    spf_ar: list[str] = []
    dmarc: list[str] = []
    policy: list[str] = []
    received_spf: list[str] = []
    for name, value in added:
        lname = name.lower()
        if lname == "authentication-results":
            out.headers.append(f"{name}: {value}")
            try:
                parsed = authres.AuthenticationResultsHeader.parse_value(value)
            except Exception as exc:  # noqa: BLE001 - authres raises assorted errors on junk
                out.problems.append(f"unparsable A-R ({exc}): {value}")
                continue
            for r in parsed.results:
                method = str(r.method).lower()
                if method == "dkim":
                    d = getattr(r, "header_d", None) or "?"
                    dkim_results.append(f"{r.result} d={str(d).lower()}")
                elif method == "spf":
                    ident = "helo" if getattr(r, "smtp_helo", None) and not getattr(
                        r, "smtp_mailfrom", None) else "mailfrom"  # fmt: skip
                    spf_ar.append(f"{r.result} ({ident})")
                elif method == "dmarc":
                    frm = getattr(r, "header_from", None)
                    dmarc.append(f"{r.result}" + (f" from={str(frm).lower()}" if frm else ""))
                    # authres drops the result comment, where OpenDMARC writes (p= dis=).
                    m = re.search(r"\bdmarc\s*=\s*\w+\s*\(([^)]*)\)", value)
                    tags = _comment_tags(m[1] if m else None)
                    if tags:
                        policy.append(" ".join(f"{k}={v}" for k, v in sorted(
                            tags.items(), key=lambda kv: ("p", "sp", "dis").index(kv[0]))))
        elif lname == "received-spf":
            out.headers.append(f"{name}: {value}")
            first = re.match(r"\s*(\w+)", value)
            identity = re.search(r"identity=(\w+)", value)
            received_spf.append(f"{first[1].lower() if first else '?'}"
                                f" ({identity[1].lower() if identity else '?'})")  # fmt: skip
        elif lname == "dkim-signature":
            out.headers.append(f"{name}: {value}")
    out.values["dkim"] = ", ".join(sorted(dkim_results)) or "-"
    out.values["spf"] = ", ".join(received_spf) or "-"
    out.values["spf-ar"] = ", ".join(spf_ar) or "-"
    out.values["dmarc"] = ", ".join(dmarc) or "-"
    out.values["policy"] = ", ".join(policy) or "-"
    out.values["signature"] = signatures(added, delivered, dnsfunc)
    return out


def _tags(value: str) -> dict[str, str]:
    tags = {}
    for part in value.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            tags[k.strip()] = re.sub(r"\s+", "", v)
    return tags


def signatures(added: list[tuple[str, str]], delivered: bytes,
               dnsfunc: Callable[..., bytes]) -> str:  # fmt: skip
    """The DKIM signatures the milter added: ``d= s= a= c=`` and whether dkimpy verifies it."""
    new = [v for n, v in added if n.lower() == "dkim-signature"]
    if not new:
        return "-"
    found = header_fields(delivered)
    all_sigs = [v for n, v in found if n.lower() == "dkim-signature"]
    parts = []
    verifier = dkim.DKIM(delivered)
    for value in new:
        t = _tags(value)
        idx = all_sigs.index(value)
        try:
            ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
        except dkim.DKIMException:
            ok = False
        parts.append(f"d={t.get('d', '?')} s={t.get('s', '?')} a={t.get('a', '?')} "
                     f"c={t.get('c', 'simple/simple')} {'valid' if ok else 'INVALID'}")  # fmt: skip
    return ", ".join(parts)


def zone_dnsfunc(records: list[tuple[str, str, str]]) -> Callable[..., bytes]:
    """A dkimpy ``dnsfunc`` answering TXT queries from the corpus records (no DNS needed)."""
    table: dict[str, list[str]] = {}
    for owner, rtype, text in records:
        if rtype == "TXT":
            table.setdefault(owner.lower().rstrip("."), []).append(text)

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        texts = table.get(name.decode("ascii").lower().rstrip("."), [])
        return texts[0].encode("ascii") if texts else b""

    return dnsfunc


@dataclass(frozen=True, slots=True)
class Deliberate:
    """A difference authmilter makes on purpose, with the RFC section that backs it."""

    reason: str
    rfc: str


@dataclass
class Row:
    """One case: both outcomes and, per field, whether they differ."""

    case: str
    area: str
    config: str
    describe: str
    anchors: Outcome
    authmilter: Outcome
    deliberate: Mapping[str, Deliberate] = field(default_factory=dict)

    def differences(self) -> list[str]:
        """The fields whose values differ."""
        return [f for f in FIELDS
                if self.anchors.values.get(f, "-") != self.authmilter.values.get(f, "-")]

    def unexplained(self) -> list[str]:
        """Differing fields that are not listed as deliberate."""
        return [f for f in self.differences() if f not in self.deliberate]
