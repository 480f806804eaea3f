"""The shared vocabulary of results: enums whose values are RFC 8601 tokens, frozen outcomes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # dmarc imports this module
    from authmilter.dmarc import DmarcRecord


class DkimResult(StrEnum):
    """RFC 8601 §2.7.1 DKIM result tokens."""

    NONE = "none"
    PASS = "pass"
    FAIL = "fail"
    POLICY = "policy"
    NEUTRAL = "neutral"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class DkimProblem(StrEnum):
    """Why a signature did not pass, in the classes OpenDKIM's ``On-*`` actions are chosen by."""

    BAD_SIGNATURE = "bad-signature"  # On-BadSignature: fail, policy, or a malformed signature
    KEY_NOT_FOUND = "key-not-found"  # On-KeyNotFound: no key record at the selector
    DNS_ERROR = "dns-error"  # On-DNSError: the key lookup failed transiently


@dataclass(frozen=True, slots=True, kw_only=True)
class DkimOutcome:
    """The verdict on one DKIM-Signature (or on its absence, with ``result=NONE``).

    ``b`` is the signature's full ``b=`` value without white space; Authentication-Results
    shows a prefix of it (RFC 6008). ``reason`` is a short human text for the header comment
    and the log.
    """

    result: DkimResult
    domain: str | None = None
    selector: str | None = None
    identity: str | None = None
    algorithm: str | None = None
    b: str | None = None
    key_bits: int | None = None
    testing: bool = False
    reason: str | None = None
    problem: DkimProblem | None = None

    @property
    def passed(self) -> bool:
        """True for ``dkim=pass``."""
        return self.result is DkimResult.PASS


class SpfResult(StrEnum):
    """RFC 7208 §2.6 / RFC 8601 SPF result tokens."""

    NONE = "none"
    NEUTRAL = "neutral"
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class DmarcResult(StrEnum):
    """RFC 7489 §11.2 DMARC result tokens."""

    NONE = "none"
    PASS = "pass"
    FAIL = "fail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class SpfIdentity(StrEnum):
    """Which identity an SPF result is about (RFC 7208 §2.3, §2.4)."""

    MAILFROM = "mailfrom"
    HELO = "helo"


@dataclass(frozen=True, slots=True, kw_only=True)
class SpfOutcome:
    """The SPF verdict for one identity of one SMTP transaction.

    ``sender`` is the identity as checked: the MAIL FROM address, or ``postmaster@<helo>`` for
    the HELO identity and for the null sender (RFC 7208 §2.4). ``domain`` is its domain.
    ``comment`` is the short human text policyd-spf writes (``domain of x designates …``).
    """

    result: SpfResult
    identity: SpfIdentity
    sender: str
    domain: str
    client_ip: str
    helo: str | None = None
    comment: str | None = None
    problem: str | None = None  # permerror/temperror detail, for logs and Received-SPF


class DmarcPolicy(StrEnum):
    """A DMARC policy value (``p=``, ``sp=``, ``np=``) or an applied disposition."""

    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"


@dataclass(frozen=True, slots=True, kw_only=True)
class DmarcOutcome:
    """The DMARC verdict for a message (RFC 7489 §6.6, DMARCbis).

    ``policy`` is the policy that applied to the From domain (p=, or sp=/np= for a subdomain or
    a non-existent domain); ``disposition`` is what the receiver is asked to do after ``pct``
    sampling and ``t=y`` testing (OpenDMARC's ``dis=``).
    """

    result: DmarcResult
    from_domain: str | None = None
    policy: DmarcPolicy | None = None
    disposition: DmarcPolicy = DmarcPolicy.NONE
    record_domain: str | None = None
    org_domain: str | None = None
    dkim_aligned: bool = False
    spf_aligned: bool = False
    testing: bool = False
    sampled_out: bool = False
    reason: str | None = None
    #: The policy record evaluated (for DMARC reports); not part of equality.
    record: DmarcRecord | None = field(default=None, compare=False, repr=False)
