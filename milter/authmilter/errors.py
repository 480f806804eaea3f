"""The exception root of authmilter and the errors that carry a file:line location."""

from __future__ import annotations

from dataclasses import dataclass


class AuthmilterError(Exception):
    """Root of every exception authmilter raises on purpose."""


@dataclass(frozen=True, slots=True)
class Location:
    """Where a piece of configuration came from: a file path and a 1-based line number."""

    path: str
    line: int | None = None

    def __str__(self) -> str:
        return self.path if self.line is None else f"{self.path}:{self.line}"


class ConfigError(AuthmilterError):
    """A configuration file, dataset or key file that cannot be used.

    ``str(err)`` is ``"file:line: message"`` (or ``"file: message"`` without a line), the form a
    postmaster can paste into an editor's go-to-line.
    """

    def __init__(self, message: str, where: Location | None = None) -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where is not None else message)


class KeyMaterialError(AuthmilterError):
    """A private or public DKIM key that cannot be used (unreadable, unsafe, malformed)."""


class DNSError(AuthmilterError):
    """Base of DNS lookup failures; see :mod:`authmilter.resolver` for the two kinds."""


class DNSTempError(DNSError):
    """A transient DNS failure (timeout, SERVFAIL, no server reachable): RFC result temperror."""


class DNSPermError(DNSError):
    """A permanent DNS failure that is not "no such name" (e.g. a malformed answer)."""


class DNSNameNotFound(DNSPermError):
    """NXDOMAIN: the name does not exist (RFC 2308 negative answer; cached like data)."""
