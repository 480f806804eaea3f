"""Handing a report message to the local MTA (``ReportSMTPServer``).

Reports leave through the MTA, never straight to the report address's MX: the MTA queues and
retries, and its milters (this one) DKIM-sign the report on the way out, so receivers can
trust it. ``ReportSMTPServer`` is ``host:port`` (SMTP with :mod:`smtplib`, default
``localhost:25``) or the absolute path of a sendmail program (run as
``sendmail -i -f SENDER -- RCPT…`` with the message on its standard input, as Postfix's and
Sendmail's ``sendmail`` take it).

:func:`submit` returns the recipients accepted and refused (with the SMTP code), and raises
:class:`SubmitError` when nothing was accepted, saying whether trying again later may help
(``temporary``: a 4xx, no connection, a timeout) or not (a 5xx).
"""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP

from authmilter.config import parse_report_server

__all__ = ["SubmitError", "Submitted", "submit"]


@dataclass(frozen=True, slots=True)
class Submitted:
    """What the MTA took: ``accepted`` recipients, and ``refused`` ones with ``(code, text)``."""

    accepted: tuple[str, ...]
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


class SubmitError(Exception):
    """The MTA took the message for no recipient.

    :param temporary: whether a later attempt may succeed (4xx, connection trouble).
    :param code: the SMTP reply code, or ``None`` when there was none.
    """

    def __init__(self, text: str, *, temporary: bool, code: int | None = None) -> None:
        super().__init__(text)
        self.temporary = temporary
        self.code = code


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _bytes(message: EmailMessage | bytes) -> bytes:
    if isinstance(message, bytes):
        return message
    return message.as_bytes(policy=SMTP)


def submit(message: EmailMessage | bytes, envelope_from: str, recipients: Sequence[str],
           server: str, *, timeout: float = 30.0) -> Submitted:  # fmt: skip
    """Hand ``message`` to the MTA at ``server`` (a ``ReportSMTPServer`` value).

    :raises SubmitError: no recipient was accepted.
    :raises ValueError: ``server`` is not a ``ReportSMTPServer`` value, or no recipients.
    """
    if not recipients:
        raise ValueError("no recipients")
    target = parse_report_server(server)
    data = _bytes(message)
    if isinstance(target, str):
        return _sendmail(target, data, envelope_from, recipients, timeout)
    host, port = target
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as smtp:
            smtp.ehlo_or_helo_if_needed()
            refused = smtp.sendmail(envelope_from, list(recipients), data)
    except smtplib.SMTPRecipientsRefused as e:
        codes = {r: (c, _text(t)) for r, (c, t) in e.recipients.items()}
        temporary = any(400 <= c < 500 for c, _ in codes.values())
        raise SubmitError(f"every recipient refused: {codes}", temporary=temporary,
                          code=min(c for c, _ in codes.values())) from None  # fmt: skip
    except smtplib.SMTPResponseException as e:  # sender refused, data refused, …
        raise SubmitError(f"{host}:{port} said {e.smtp_code} {_text(e.smtp_error)}",
                          temporary=not 500 <= e.smtp_code < 600, code=e.smtp_code) from None
    except (smtplib.SMTPException, OSError) as e:  # TimeoutError is an OSError
        raise SubmitError(f"cannot submit to {host}:{port}: {e}", temporary=True) from None
    bad = {r: (c, _text(t)) for r, (c, t) in refused.items()}
    return Submitted(tuple(r for r in recipients if r not in bad), bad)


def _sendmail(program: str, data: bytes, envelope_from: str, recipients: Sequence[str],
              timeout: float) -> Submitted:  # fmt: skip
    try:
        done = subprocess.run([program, "-i", "-f", envelope_from, "--", *recipients],
                              input=data, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SubmitError(f"cannot run {program}: {e}", temporary=True) from None
    if done.returncode != 0:
        why = _text(done.stderr).strip() or f"exit status {done.returncode}"
        # sysexits.h: 75 EX_TEMPFAIL; everything else is taken as permanent.
        raise SubmitError(f"{program}: {why}", temporary=done.returncode == 75) from None
    return Submitted(tuple(recipients))
