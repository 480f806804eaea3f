"""Shared parts of the ARC end-to-end tests through real Postfix (test_arc_forwarding.py,
test_arc_rspamd_postfix.py).

:class:`Stack` is one mail host: ``authmilter run`` (:class:`milter_fixture.AuthmilterProcess`)
behind a private Postfix (:class:`postfix_fixture.PostfixInstance`) that relays to its sink.
:func:`write_key` puts an RSA key where a KeyTable can name it (0600: the milter refuses
readable keys). :func:`list_rewrite` is what a mailing list does to a post before resending
it, the change that breaks the author's DKIM signature and that ARC exists to vouch for.
The reading helpers take a message as delivered (CRLF, folded fields) and return the
unfolded values a test asserts on.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import dkim

from authmilter.keys import PrivateKey
from milter_fixture import AuthmilterProcess
from postfix_fixture import Port, PostfixInstance, SmtpRejected

#: Where the mail of a test goes at the end: a recipient at the MX's own domain.
SUBSCRIBER = "bob@ours.test"


@dataclass(frozen=True, slots=True)
class Exchange:
    """One SMTP transaction through a :class:`Stack`: the message as the sink got it (``None``
    when Postfix refused it), the refusal, and the milter's verdict log line."""

    delivered: bytes | None
    rejected: SmtpRejected | None
    log: str


@dataclass
class Stack:
    """A milter and the Postfix that calls it; :meth:`stop` ends both."""

    milter: AuthmilterProcess
    postfix: PostfixInstance

    def exchange(self, message: bytes, *, mail_from: str, rcpt_to: str = SUBSCRIBER,
                 port: Port = "inbound", client_ip: str | None = None) -> Exchange:  # fmt: skip
        """Send one message; wait for its delivery (when accepted) and the milter's verdict.

        The transactions of a test module run one after another, so the verdict is the first
        ``action=`` line the milter logs after the send began.
        """
        seen = len(self.milter.log())
        before = len(self.postfix.delivered())
        try:
            self.postfix.send(message, mail_from=mail_from, rcpt_to=[rcpt_to], port=port,
                              client_ip=client_ip)  # fmt: skip
        except SmtpRejected as exc:
            return Exchange(None, exc, self._verdict_line(seen))
        delivered = self.postfix.wait_delivered(before + 1)
        assert len(delivered) == before + 1, "one message sent, one delivered"
        return Exchange(delivered[-1], None, self._verdict_line(seen))

    def deliver(self, message: bytes, *, mail_from: str, rcpt_to: str = SUBSCRIBER,
                port: Port = "inbound", client_ip: str | None = None) -> bytes:  # fmt: skip
        """:meth:`exchange` for a message that must be delivered; returns it as delivered."""
        result = self.exchange(message, mail_from=mail_from, rcpt_to=rcpt_to, port=port,
                               client_ip=client_ip)  # fmt: skip
        assert result.delivered is not None, f"refused: {result.rejected}\n{result.log}"
        return result.delivered

    def _verdict_line(self, seen: int, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.milter.log()[seen:].splitlines() if " action=" in line]
            if lines:
                return lines[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no verdict logged:\n{self.milter.log()[seen:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.postfix.stop()
        self.milter.cleanup()


def start_stack(conf: str, *, name: str) -> Stack:
    """``conf`` is the milter's configuration (without Socket); Postfix calls it for both of
    its listeners."""
    milter = AuthmilterProcess(f"SyslogSuccess yes\n{conf}", name=name)
    try:
        milter.start()
        postfix = PostfixInstance(milter.postfix_socket).start()
    except BaseException:
        milter.cleanup()  # its directory too, which a failed start leaves
        raise
    return Stack(milter, postfix)


def write_key(directory: Path, name: str, key: PrivateKey) -> Path:
    """The PEM key in ``directory/name.private``, mode 0600."""
    path = directory / f"{name}.private"
    path.touch(mode=0o600)
    path.write_bytes(key.pem())
    return path


def list_rewrite(delivered: bytes, *, tag: str = "[list]", list_id: str = "list.test",
                 footer: bytes = b"--\r\nlist mailing list -- unsubscribe: list-leave@list.test\r\n"
                 ) -> bytes:  # fmt: skip
    """A mailing list's resend of a post as the list's MTA delivered it: the Subject gets
    ``tag``, a List-Id field is added, the footer is appended to the (plain-text) body. Our own
    MTA's Received field is kept, as a list manager keeps the trace fields."""
    head, sep, body = delivered.partition(b"\r\n\r\n")
    assert sep, "a message with a body"
    head, count = re.subn(rb"(?im)^Subject:[ \t]*", b"Subject: " + tag.encode() + b" ", head,
                          count=1)  # fmt: skip
    assert count == 1, "the post has a Subject"
    head += f"\r\nList-Id: <{list_id}>".encode()
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return head + sep + body + footer


# -- reading delivered messages -----------------------------------------------------------------


def split(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Header fields (top first) and body, as :func:`authmilter.arc_verify.verify_chain`
    takes them."""
    headers, body = dkim.rfc822_parse(message)
    return [(bytes(name), bytes(value)) for name, value in headers], bytes(body)


def field_values(message: bytes, name: str) -> list[str]:
    """The values of every ``name`` field, top first, unfolded to single spaces."""
    headers, _ = split(message)
    return [" ".join(value.decode("utf-8", "replace").split()) for n, value in headers
            if n.decode().lower() == name.lower()]  # fmt: skip


def results_of(message: bytes, authserv_id: str) -> str:
    """The one Authentication-Results value (unfolded) whose authserv-id is ``authserv_id``."""
    values = [v for v in field_values(message, "Authentication-Results")
              if re.match(rf"{re.escape(authserv_id)}\s*;", v, re.I)]  # fmt: skip
    assert len(values) == 1, (authserv_id, field_values(message, "Authentication-Results"))
    return values[0]


def clauses(results: str) -> list[str]:
    """The clauses of an Authentication-Results value after the authserv-id, split at the
    semicolons that are not inside a comment or a quoted string (``dkim=fail (2048-bit key;
    body hash did not verify) header.d=…`` is one clause)."""
    parts, depth, quoted, current = [], 0, False, ""
    for char in results:
        if quoted:
            quoted = char != '"'
        elif char == '"':
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        elif char == ";" and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += char
    parts.append(current.strip())
    return parts[1:]


def has_clause(results: str, start: str, *words: str) -> bool:
    """Whether the A-R value has a clause beginning with ``start`` (``dkim=pass``) that
    contains each of ``words`` (``header.d=list.test``)."""
    return any(c.startswith(start) and all(w in c for w in words) for c in clauses(results))


def tags(value: str) -> dict[str, str]:
    """A DKIM-style tag-list (an AMS, a seal) with white space removed from the values."""
    items = (item.split("=", 1) for item in value.split(";") if "=" in item)
    return {name.strip(): re.sub(r"\s+", "", text) for name, text in items}


def arc_sets(message: bytes) -> dict[int, dict[str, str]]:
    """Per instance, the unfolded values of the three ARC fields (keys ``seal``, ``ams``,
    ``aar``); an instance missing one of them lacks that key."""
    found: dict[int, dict[str, str]] = {}
    for key, name in (("seal", "ARC-Seal"), ("ams", "ARC-Message-Signature"),
                      ("aar", "ARC-Authentication-Results")):  # fmt: skip
        for value in field_values(message, name):
            match = re.match(r"\s*i\s*=\s*(\d+)\s*;", value)
            assert match, (name, value)
            found.setdefault(int(match.group(1)), {})[key] = value
    return found
