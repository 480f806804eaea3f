"""DKIM key material: private keys, key records (RFC 6376 §3.6.1, RFC 8463) and key tests.

Private keys are loaded from the forms OpenDKIM and dkimpy users have on disk: PEM PKCS#1
(``BEGIN RSA PRIVATE KEY``, old opendkim-genkey), PEM PKCS#8 (``BEGIN PRIVATE KEY``, RSA from
opendkim-genkey on OpenSSL 3, or Ed25519), dkimpy's base64 Ed25519 seed, and base64 DER
without PEM armour (an inline key in a KeyTable).

Public key records are parsed strictly enough to say precisely what is wrong and leniently
where the RFC asks to ignore (unknown tags, unknown flags and hash names).
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import grp
import os
import pwd
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from authmilter.errors import DNSError, DNSNameNotFound, KeyMaterialError
from authmilter.taglist import parse_tag_list

if TYPE_CHECKING:
    from authmilter.resolver import Resolver

__all__ = [
    "MAX_KEY_FILE_SIZE",
    "MIN_RSA_BITS",
    "RECOMMENDED_RSA_BITS",
    "TXT_STRING_MAX",
    "KeyAlgorithm",
    "KeyRecord",
    "KeyRecordError",
    "KeyTestResult",
    "KeyTestStatus",
    "PrivateKey",
    "PrivateKeyObject",
    "PublicKeyObject",
    "bind_txt",
    "dkim_qp_decode",
    "dkim_qp_encode",
    "generate_private_key",
    "key_record_name",
    "key_record_text",
    "key_owners",
    "load_private_key",
    "parse_key_record",
    "parse_private_key",
    "test_key",
    "unsafe_key_file_reason",
]

#: RFC 8301 §3.2: verifiers MUST NOT consider RSA keys under 1024 bits valid.
MIN_RSA_BITS = 1024
#: RFC 8301 §3.2: signers SHOULD use at least 2048 bits.
RECOMMENDED_RSA_BITS = 2048
#: A DNS character-string holds at most 255 octets (RFC 1035 §3.3).
TXT_STRING_MAX = 255
#: A key file larger than this is refused unread (a 16384-bit RSA PEM is under 13 KiB).
MAX_KEY_FILE_SIZE = 64 * 1024
#: The hash authmilter signs with (RFC 8301 made sha1 historic).
SIGNING_HASH = "sha256"

PrivateKeyObject = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKeyObject = rsa.RSAPublicKey | ed25519.Ed25519PublicKey

_FWS = " \t\r\n"
_LIST_ITEM = re.compile(r"[A-Za-z0-9*][A-Za-z0-9_.*+-]*\Z")


class KeyAlgorithm(StrEnum):
    """A DKIM key type; the value is the ``k=`` tag token."""

    RSA = "rsa"  # RFC 6376 §3.3.1
    ED25519 = "ed25519"  # RFC 8463 §3


# --------------------------------------------------------------------------------------------
# Private keys
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrivateKey:
    """A loaded DKIM private key.

    ``bits`` is the RSA modulus size, 256 for Ed25519; ``source`` is the file path, or
    ``"inline"``/``"generated"``.
    """

    algorithm: KeyAlgorithm
    key: PrivateKeyObject = field(repr=False)
    bits: int
    source: str

    def public_key(self) -> PublicKeyObject:
        """Return the matching ``cryptography`` public key."""
        return self.key.public_key()

    def public_bytes(self) -> bytes:
        """Return what ``p=`` carries, decoded.

        RSA: the DER SubjectPublicKeyInfo, as ``openssl rsa -pubout`` (and so opendkim-genkey)
        publishes. Ed25519: the raw 32-byte public key (RFC 8463 §4).
        """
        public = self.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_p(self) -> str:
        """Return the base64 ``p=`` value of the key record for this key."""
        return base64.b64encode(self.public_bytes()).decode("ascii")

    def pem(self) -> bytes:
        """Return the key as PEM: RSA as PKCS#1 (``BEGIN RSA PRIVATE KEY``), Ed25519 as PKCS#8."""
        private_format = (
            serialization.PrivateFormat.TraditionalOpenSSL
            if isinstance(self.key, rsa.RSAPrivateKey)
            else serialization.PrivateFormat.PKCS8
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, private_format, serialization.NoEncryption()
        )

    def dkimpy_private(self) -> bytes:
        """Return the ``privkey=`` value dkimpy's ``sign()`` takes for this algorithm.

        RSA: PKCS#1 PEM (dkimpy parses the armour itself). Ed25519: the base64 of the raw
        32-byte seed, which dkimpy hands to ``nacl.signing.SigningKey`` with a Base64Encoder.
        """
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            seed = self.key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            return base64.b64encode(seed)
        return self.pem()

    def matches(self, public: PublicKeyObject) -> bool:
        """Tell whether ``public`` is this key's public half."""
        mine = self.public_key()
        if isinstance(mine, rsa.RSAPublicKey) and isinstance(public, rsa.RSAPublicKey):
            return mine.public_numbers() == public.public_numbers()
        if isinstance(mine, ed25519.Ed25519PublicKey) and isinstance(
            public, ed25519.Ed25519PublicKey
        ):
            raw = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return mine.public_bytes(*raw) == public.public_bytes(*raw)
        return False


def _wrap(key: object, source: str) -> PrivateKey:
    """Turn a ``cryptography`` private key into a :class:`PrivateKey`, or refuse its type."""
    if isinstance(key, rsa.RSAPrivateKey):
        return PrivateKey(KeyAlgorithm.RSA, key, key.key_size, source)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return PrivateKey(KeyAlgorithm.ED25519, key, 256, source)
    kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "") or type(key).__name__
    raise KeyMaterialError(
        f"{source}: unsupported key type {kind}; DKIM signs with rsa (RFC 6376) "
        "or ed25519 (RFC 8463)"
    )


def parse_private_key(data: bytes, *, source: str) -> PrivateKey:
    """Parse a private key in any form OpenDKIM or dkimpy accept.

    Forms: PEM PKCS#1 RSA, PEM PKCS#8 RSA or Ed25519, dkimpy's base64 raw Ed25519 seed
    (32 bytes; the 64-byte seed+public form of libsodium is accepted too), and base64 DER
    (PKCS#1 or PKCS#8) without PEM armour, as an inline KeyTable key. Whitespace around
    and inside the base64 forms is ignored.

    :param source: where the data came from, for messages (a path or ``"inline"``).
    :raises KeyMaterialError: the data is empty, encrypted, a public key or certificate, not
        a key at all, or a key type DKIM does not use; the message names ``source``.
    """
    text = data.strip()
    if not text:
        raise KeyMaterialError(f"{source}: key data is empty")
    if text.startswith(b"-----BEGIN"):
        first_line = text.split(b"\n", 1)[0].decode("ascii", "replace").strip()
        if "ENCRYPTED" in first_line or b"Proc-Type: 4,ENCRYPTED" in text:
            raise KeyMaterialError(
                f"{source}: the private key is encrypted; store it unencrypted "
                "(openssl pkey -in KEY -out KEY.new) and protect it with file permissions"
            )
        if "PUBLIC KEY" in first_line or "CERTIFICATE" in first_line:
            raise KeyMaterialError(f"{source}: {first_line} holds a public key, not a private key")
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except TypeError:
            raise KeyMaterialError(f"{source}: the private key is password-protected") from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise KeyMaterialError(
                f"{source}: cannot parse the PEM private key after {first_line!r}: {exc}"
            ) from None
        return _wrap(key, source)

    compact = b"".join(text.split())
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise KeyMaterialError(
            f"{source}: not a private key: neither PEM (-----BEGIN ...) nor base64"
        ) from None
    if len(raw) == 32:
        # dkimpy's dknewkey and RFC 8463 tooling store the raw Ed25519 seed in base64.
        return _wrap(ed25519.Ed25519PrivateKey.from_private_bytes(raw), source)
    if len(raw) == 64:
        # libsodium/NaCl "secret key": seed || public key.
        ed_key = ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32])
        public = ed_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        if public != raw[32:]:
            raise KeyMaterialError(
                f"{source}: 64 bytes of base64 look like an Ed25519 seed+public key, "
                "but the halves do not belong together"
            )
        return _wrap(ed_key, source)
    try:
        der_key = serialization.load_der_private_key(raw, password=None)
    except TypeError:
        raise KeyMaterialError(f"{source}: the private key is password-protected") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyMaterialError(
            f"{source}: base64 data ({len(raw)} bytes) is not a DER private key "
            "(PKCS#1 or PKCS#8) nor a 32-byte Ed25519 seed"
        ) from None
    return _wrap(der_key, source)


def _user_names_sharing_group(gid: int, trusted: frozenset[int]) -> list[str]:
    """Names of users other than the trusted ones that can use group ``gid``.

    :raises KeyError: the group is unknown to the group database.
    """
    names = {_user_name(uid) for uid in trusted}
    group = grp.getgrgid(gid)
    others = [m for m in group.gr_mem if m not in names]
    others += [
        p.pw_name
        for p in pwd.getpwall()
        if p.pw_gid == gid and p.pw_uid not in trusted and p.pw_name not in others
    ]
    return others


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _access_words(bits: int, read: int, write: int) -> str:
    words = [w for w, b in (("readable", read), ("writable", write)) if bits & b]
    return " and ".join(words)


def _group_problem(st: os.stat_result, trusted: frozenset[int]) -> str | None:
    """``None`` when the file's group holds no user but trusted ones, else why not."""
    try:
        others = _user_names_sharing_group(st.st_gid, trusted)
    except KeyError:
        return f"its group (gid {st.st_gid}) is not in the group database"
    if not others:
        return None
    group_name = grp.getgrgid(st.st_gid).gr_name
    return f"group '{group_name}' also holds user '{others[0]}'"


def key_owners(extra: Iterable[int] = ()) -> frozenset[int]:
    """Who may own a key file and the folders above it: root, the running user, and
    ``extra`` (the ``UserID`` user, whom the workers become)."""
    return frozenset({0, os.geteuid(), *extra})


def _owner_words(trusted: frozenset[int]) -> str:
    names = [_user_name(uid) for uid in sorted(trusted) if uid != 0]
    return " or ".join(["root", *names])


def unsafe_key_file_reason(path: str, trusted: frozenset[int] | None = None) -> str | None:
    """Tell why a private key file is not safe, or ``None`` when it is. The reason ends with
    what to do about it (``chmod 600 FILE``, ``chown root FILE`` …).

    The rule is OpenDKIM's ``dkimf_securefile()`` (what ``RequireSafeKeys`` enforces), with
    the owners that may be trusted given by ``trusted`` (default :func:`key_owners`: root and
    the running user; the server adds the ``UserID`` user), and stricter for the file itself:

    - the file is owned by a trusted user;
    - it is not readable or writable by group or others (``mode & 0o066``). OpenDKIM allows
      group access when no other user can be in the file's group (``0640 root:opendkim``);
      authmilter refuses it, so a key never becomes readable by adding a user to a group;
    - no directory above it can be written by others, or by a group holding untrusted
      users, or is owned (and writable) by an untrusted user. A folder owned by a trusted
      user with mode 0700 (Debian's ``/etc/dkimkeys``, owned by the milter's user) is fine.

    One deliberate difference the other way: a world-writable directory with the sticky bit
    (``/tmp``) is accepted, as nobody else can rename or delete the entries of ours below it;
    OpenDKIM refuses it.

    :raises OSError: the file or a directory above it cannot be examined.
    """
    trusted = key_owners() if trusted is None else trusted
    real = os.path.realpath(path)
    st = os.stat(real)
    mode = stat.S_IMODE(st.st_mode)
    owners = _owner_words(trusted)
    if st.st_uid not in trusted:
        return (
            f"owned by uid {st.st_uid} ({_user_name(st.st_uid)}), which may not own keys "
            f"(only {owners}); chown it to one of those, or set RequireSafeKeys false"
        )
    other_bits = mode & (stat.S_IROTH | stat.S_IWOTH)
    group_bits = mode & (stat.S_IRGRP | stat.S_IWGRP)
    if group_bits or other_bits:
        access = _access_words(group_bits | (other_bits << 3), stat.S_IRGRP, stat.S_IWGRP)
        return (f"mode {mode:04o} is {access} by group/others; chmod 600 it or set "
                "RequireSafeKeys false")  # fmt: skip

    directory = os.path.dirname(real)
    while True:
        dst = os.stat(directory)
        dmode = stat.S_IMODE(dst.st_mode)
        sticky = bool(dmode & stat.S_ISVTX)
        if dmode & stat.S_IWOTH and not sticky:
            return (f"directory {directory} (mode {dmode:04o}) is writable by others; "
                    f"chmod o-w {directory}")  # fmt: skip
        if dmode & stat.S_IWGRP and not sticky:
            reason = _group_problem(dst, trusted)
            if reason is not None:
                return (f"directory {directory} (mode {dmode:04o}) is group-writable and "
                        f"{reason}; chmod g-w {directory}")  # fmt: skip
        if dmode & stat.S_IWUSR and dst.st_uid not in trusted:
            return (
                f"directory {directory} is writable by its owner uid {dst.st_uid} "
                f"({_user_name(dst.st_uid)}), who may not own keys (only {owners}); chown "
                f"it to one of those"
            )
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def load_private_key(path: str | os.PathLike[str], *, require_safe: bool = True,
                     trusted: frozenset[int] | None = None) -> PrivateKey:  # fmt: skip
    """Read and parse the private key file at ``path``.

    With ``require_safe`` (OpenDKIM's ``RequireSafeKeys``, on by default) a file that others
    could read or replace is refused; see :func:`unsafe_key_file_reason` for the exact rule
    and ``trusted``, e.g. ``/etc/dkim/sel.private: mode 0644 is readable by group/others;
    chmod 600 it or set RequireSafeKeys false``.

    :raises KeyMaterialError: the file cannot be read (with the OS reason), is not a regular
        file, is unsafe, or does not hold a usable key.
    """
    name = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO planted at the name must not hang us; regular files ignore it.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise KeyMaterialError(f"{name}: cannot open key file: {exc.strerror}"
                               f"{_who_cannot(exc)}") from None  # fmt: skip
    except ValueError as exc:  # a NUL in the name: "embedded null byte"
        raise KeyMaterialError(f"{name!r}: cannot open key file: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyMaterialError(f"{name}: not a regular file")
        if st.st_size > MAX_KEY_FILE_SIZE:
            raise KeyMaterialError(
                f"{name}: {st.st_size} bytes is too large for a key file "
                f"(limit {MAX_KEY_FILE_SIZE})"
            )
        if require_safe:
            try:
                reason = unsafe_key_file_reason(name, trusted)
            except OSError as exc:
                raise KeyMaterialError(f"{name}: cannot check permissions: {exc}") from None
            if reason is not None:
                raise KeyMaterialError(f"{name}: {reason}")
        chunks: list[bytes] = []
        while chunk := os.read(fd, MAX_KEY_FILE_SIZE + 1):
            chunks.append(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise KeyMaterialError(f"{name}: cannot read key file: {exc.strerror}") from None
    finally:
        os.close(fd)
    return parse_private_key(data, source=name)


def _who_cannot(exc: OSError) -> str:
    """For a refused open: who tried (the keys are read by the supervisor, as the user that
    started authmilter)."""
    if exc.errno not in (errno.EACCES, errno.EPERM):
        return ""
    uid = os.geteuid()
    return (f" (authmilter reads keys as the user that started it, here uid {uid} "
            f"({_user_name(uid)}); start it as root, or let that user read the file)")


def generate_private_key(algorithm: KeyAlgorithm | str, bits: int = 2048) -> PrivateKey:
    """Generate a new key; ``bits`` applies to RSA only (public exponent 65537).

    :raises ValueError: RSA ``bits`` under 1024 (RFC 8301 §3.2) or an unknown algorithm.
    """
    algo = KeyAlgorithm(algorithm)
    if algo is KeyAlgorithm.ED25519:
        return _wrap(ed25519.Ed25519PrivateKey.generate(), "generated")
    if bits < MIN_RSA_BITS:
        raise ValueError(
            f"RSA keys under {MIN_RSA_BITS} bits are not valid for DKIM (RFC 8301 §3.2); "
            f"asked for {bits}"
        )
    return _wrap(rsa.generate_private_key(public_exponent=65537, key_size=bits), "generated")


# --------------------------------------------------------------------------------------------
# Key records
# --------------------------------------------------------------------------------------------


class KeyRecordError(KeyMaterialError):
    """A DKIM key TXT record that cannot be used; the message says which tag and why."""


def _split_list(tag: str, value: str) -> tuple[str, ...]:
    """Split a colon-separated tag value (h=, s=, t=), whitespace allowed around colons."""
    items = tuple(item.strip(_FWS) for item in value.split(":"))
    for item in items:
        if not item:
            raise KeyRecordError(f"{tag}= has an empty item in {value!r}")
        if not _LIST_ITEM.match(item):
            raise KeyRecordError(f"{tag}= has an invalid item {item!r}")
    return items


def dkim_qp_encode(text: str) -> str:
    """Encode ``text`` as DKIM-Quoted-Printable (RFC 6376 §2.11), e.g. for ``n=``."""
    out = []
    for byte in text.encode("utf-8"):
        # dkim-safe-char = %x21-3A / %x3C / %x3E-7E
        if 0x21 <= byte <= 0x3A or byte == 0x3C or 0x3E <= byte <= 0x7E:
            out.append(chr(byte))
        else:
            out.append(f"={byte:02X}")
    return "".join(out)


def dkim_qp_decode(text: str) -> str:
    """Decode DKIM-Quoted-Printable; whitespace is dropped, malformed ``=`` kept literally."""
    compact = "".join(text.split())
    data = bytearray()
    i = 0
    while i < len(compact):
        char = compact[i]
        hex_digits = compact[i + 1 : i + 3]
        if char == "=" and re.fullmatch(r"[0-9A-Fa-f]{2}", hex_digits):
            data.append(int(hex_digits, 16))
            i += 3
        else:
            data += char.encode("utf-8")
            i += 1
    return data.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRecord:
    """A parsed DKIM key record (``selector._domainkey.domain`` TXT).

    ``hash_algorithms`` is ``None`` when ``h=`` is absent (any hash allowed);
    ``public_key_data`` is the decoded ``p=`` (empty: revoked); ``notes`` is the decoded
    ``n=``; ``tags`` keeps every tag as found, unknown ones included.
    """

    key_type: KeyAlgorithm = KeyAlgorithm.RSA
    public_key_data: bytes
    version: str | None = None
    hash_algorithms: tuple[str, ...] | None = None
    notes: str | None = None
    service_types: tuple[str, ...] = ("*",)
    flags: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def revoked(self) -> bool:
        """``p=`` is empty: the key has been revoked (RFC 6376 §3.6.1)."""
        return not self.public_key_data

    @property
    def testing(self) -> bool:
        """``t=y``: the domain is testing DKIM; verifiers must not treat mail differently."""
        return "y" in self.flags

    @property
    def strict_subdomains(self) -> bool:
        """``t=s``: the i= domain must equal d=, no subdomains (RFC 6376 §3.6.1)."""
        return "s" in self.flags

    @property
    def allows_email(self) -> bool:
        """``s=`` includes ``email`` or ``*``."""
        return "*" in self.service_types or "email" in self.service_types

    def allows_hash(self, name: str) -> bool:
        """Tell whether ``h=`` permits hash ``name`` (absent ``h=`` permits all)."""
        return self.hash_algorithms is None or name in self.hash_algorithms

    def public_key(self) -> PublicKeyObject:
        """Return the ``cryptography`` public key from ``p=``.

        RSA accepts a DER SubjectPublicKeyInfo (what everyone publishes) or a bare PKCS#1
        RSAPublicKey (RFC 6376's literal wording); Ed25519 needs the raw 32 bytes (RFC 8463).

        :raises KeyRecordError: the key is revoked or ``p=`` does not hold a key of ``k=``.
        """
        if self.revoked:
            raise KeyRecordError("key is revoked (empty p=)")
        return _load_public_key(self.key_type, self.public_key_data)


@functools.lru_cache(maxsize=1024)
def _load_public_key(key_type: KeyAlgorithm, data: bytes) -> PublicKeyObject:
    """The key object of ``p=`` data, loaded once for the 1024 most recent keys (key objects
    are immutable; a verifier meets the same few keys all day). Errors are not kept.

    :raises KeyRecordError: ``data`` does not hold a key of ``key_type``.
    """
    if key_type is KeyAlgorithm.ED25519:
        if len(data) != 32:
            raise KeyRecordError(
                f"p= holds {len(data)} bytes; an ed25519 key is 32 raw bytes (RFC 8463 §4)"
            )
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        try:
            key = serialization.load_der_public_key(_spki_from_pkcs1(data))
        except (ValueError, UnsupportedAlgorithm):
            raise KeyRecordError("p= is not a DER RSA public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyRecordError(f"p= holds a {type(key).__name__}, but k=rsa")
    return key


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _spki_from_pkcs1(pkcs1: bytes) -> bytes:
    """Wrap a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo (rsaEncryption, NULL params)."""
    algorithm = bytes.fromhex("300d06092a864886f70d0101010500")
    bit_string = b"\x03" + _der_length(len(pkcs1) + 1) + b"\x00" + pkcs1
    body = algorithm + bit_string
    return b"\x30" + _der_length(len(body)) + body


def parse_key_record(text: str | bytes) -> KeyRecord:
    """Parse a DKIM key record (RFC 6376 §3.6.1, RFC 8463).

    Tags: ``v`` (optional; if present, first and ``DKIM1``), ``h`` (colon list), ``k``
    (``rsa`` default, or ``ed25519``; case-insensitive), ``n`` (notes, DKIM-Quoted-Printable),
    ``p`` (required; base64, whitespace allowed; empty = revoked), ``s`` (colon list, default
    ``*``), ``t`` (colon list of flags). Unknown tags, hash names, service types and flags
    are kept and otherwise ignored, as the RFC requires.

    :raises KeyRecordError: syntax error, duplicate tag, bad ``v=``, missing ``p=``,
        ``p=`` not base64, or unknown ``k=``.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        pairs = parse_tag_list(text)
    except ValueError as exc:
        raise KeyRecordError(f"key record syntax: {exc}") from None
    if not pairs:
        raise KeyRecordError("key record is empty")
    tags = dict(pairs)

    version = tags.get("v")
    if version is not None:
        if pairs[0][0] != "v":
            raise KeyRecordError("v= must be the first tag of a key record (RFC 6376 §3.6.1)")
        if version != "DKIM1":
            raise KeyRecordError(f"v={version} is not DKIM1")

    key_text = tags.get("k", "rsa").lower()
    try:
        key_type = KeyAlgorithm(key_text)
    except ValueError:
        raise KeyRecordError(f"unknown key type k={tags['k']} (known: rsa, ed25519)") from None

    if "p" not in tags:
        raise KeyRecordError("missing p= (the public key) in key record")
    p_compact = "".join(tags["p"].split())
    try:
        public_key_data = base64.b64decode(p_compact, validate=True) if p_compact else b""
    except (binascii.Error, ValueError) as exc:
        raise KeyRecordError(f"p= is not valid base64: {exc}") from None

    hash_algorithms = _split_list("h", tags["h"]) if "h" in tags else None
    service_types = _split_list("s", tags["s"]) if "s" in tags else ("*",)
    flags = _split_list("t", tags["t"]) if "t" in tags else ()
    notes = dkim_qp_decode(tags["n"]) if "n" in tags else None
    return KeyRecord(
        key_type=key_type,
        public_key_data=public_key_data,
        version=version,
        hash_algorithms=hash_algorithms,
        notes=notes,
        service_types=service_types,
        flags=flags,
        tags=tuple(pairs),
    )


def key_record_text(
    key: PrivateKey,
    *,
    hash_algorithms: Sequence[str] | None = None,
    restrict_email: bool = False,
    no_subdomains: bool = False,
    testmode: bool = False,
    note: str | None = None,
) -> str:
    """Return the key record publishing ``key``'s public half.

    Tags come in opendkim-genkey's order, ``v=DKIM1; n=…; h=…; k=…; t=…; s=email; p=…``,
    and only when they say something; ``k=`` is always written, as opendkim-genkey does.
    ``n=`` is DKIM-Quoted-Printable (opendkim-genkey writes ``n="…"`` unencoded, which
    loses spaces on decoding).

    :raises ValueError: a hash algorithm name is not a token.
    """
    parts = ["v=DKIM1"]
    if note is not None:
        parts.append(f"n={dkim_qp_encode(note)}")
    if hash_algorithms:
        for name in hash_algorithms:
            if not _LIST_ITEM.match(name):
                raise ValueError(f"invalid hash algorithm name {name!r}")
        parts.append("h=" + ":".join(hash_algorithms))
    parts.append(f"k={key.algorithm.value}")
    flags = [flag for flag, on in (("y", testmode), ("s", no_subdomains)) if on]
    if flags:
        parts.append("t=" + ":".join(flags))
    if restrict_email:
        parts.append("s=email")
    parts.append(f"p={key.public_p()}")
    return "; ".join(parts)


def key_record_name(selector: str, domain: str) -> str:
    """Return ``selector._domainkey.domain`` (no trailing dot)."""
    return f"{selector}._domainkey.{domain.rstrip('.')}"


def _quote(chunk: bytes) -> str:
    escaped = "".join(
        "\\" + chr(b) if chr(b) in '"\\' else chr(b) if 0x20 <= b < 0x7F else f"\\{b:03d}"
        for b in chunk
    )
    return f'"{escaped}"'


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def bind_txt(selector: str, domain: str, record_text: str, *, append_domain: bool) -> str:
    """Return the zone-file stub opendkim-genkey writes to ``<selector>.txt``.

    Shape (``<TAB>`` is a tab character; continuation lines start with a tab and two spaces)::

        sel._domainkey<TAB>IN<TAB>TXT<TAB>( "v=DKIM1; h=sha256; k=rsa; "
        <TAB>  "p=MIIBIjANBg…(250 key characters)"
        <TAB>  "…rest of the key" )  ; ----- DKIM key sel for example.com

    The tags before ``p=`` make the first string, then ``p=`` plus 250 characters of key,
    then 250 characters per string: every string stays under the 255-octet limit. With
    ``append_domain`` the owner is ``sel._domainkey.example.com.``; without a domain there
    is no comment.
    """
    owner = f"{selector}._domainkey"
    if append_domain:
        owner += f".{domain.rstrip('.')}."
    data = record_text.encode("utf-8")
    match = re.search(rb"(?:^|;)[ \t]*(p[ \t]*=)", data)
    if match is None:
        strings = _chunks(data, TXT_STRING_MAX)
    else:
        head, tail = data[: match.start(1)], data[match.start(1) :]
        key_start = match.end(1) - match.start(1)
        strings = _chunks(head, TXT_STRING_MAX)
        strings.append(tail[: key_start + 250])
        strings += _chunks(tail[key_start + 250 :], 250)
    strings = [s for s in strings if s] or [b""]
    body = "\n\t  ".join(_quote(s) for s in strings)
    comment = f"  ; ----- DKIM key {selector} for {domain.rstrip('.')}" if domain else ""
    return f"{owner}\tIN\tTXT\t( {body} ){comment}\n"


# --------------------------------------------------------------------------------------------
# Key tests (the testkey command)
# --------------------------------------------------------------------------------------------


class KeyTestStatus(StrEnum):
    """The outcome of :func:`test_key`."""

    OK = "ok"
    TESTING = "testing"  # OK, but the record says t=y
    NO_RECORD = "no_record"
    MALFORMED = "malformed"
    MISMATCH = "mismatch"
    REVOKED = "revoked"
    DNS_ERROR = "dns_error"


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyTestResult:
    """What :func:`test_key` found for one selector; ``message`` is one precise sentence."""

    status: KeyTestStatus
    domain: str
    selector: str
    name: str
    message: str
    record: KeyRecord | None = None
    warnings: tuple[str, ...] = ()
    #: Whether the answer that carried the key record was DNSSEC-validated: the AD flag of the
    #: response (see :class:`authmilter.resolver.DnssecTxt`). ``None`` when no record came
    #: back (NXDOMAIN, no TXT record, DNS error), as opendkim-testkey then says nothing either.
    dnssec: bool | None = None
    #: The nameserver that gave the answer (``address:port``), when one did.
    nameserver: str | None = None

    @property
    def ok(self) -> bool:
        """The key is usable: status ``ok`` or ``testing``."""
        return self.status in (KeyTestStatus.OK, KeyTestStatus.TESTING)


def test_key(
    resolver: Resolver, domain: str, selector: str, private_key: PrivateKey | None
) -> KeyTestResult:
    """Fetch ``selector._domainkey.domain`` and check it, against ``private_key`` if given.

    The record is asked for with DNSSEC (:meth:`Resolver.txt_dnssec`): when it comes back, the
    result's ``dnssec`` says whether the answer carried the AD flag, whatever the status.

    Multiple TXT records at the name are reported as ``malformed``: RFC 6376 §3.6.2.2 lets a
    verifier pick any one of them (dkimpy takes the first, libopendkim refuses the answer with
    "multiple DNS replies"), so only one can be published reliably.

    Checks, in order: the lookup (``dns_error``, ``no_record`` on NXDOMAIN or no TXT), one
    record, its syntax and key (``malformed``, also RSA under 1024 bits per RFC 8301),
    revocation (``revoked``), ``s=`` allowing email, ``h=`` allowing sha256, ``k=`` and the
    public key against the private key (``mismatch``). A good record with ``t=y`` gives
    ``testing``, which :attr:`KeyTestResult.ok` still counts as usable.
    """
    name = key_record_name(selector, domain)
    dnssec: bool | None = None
    nameserver: str | None = None

    def result(
        status: KeyTestStatus,
        message: str,
        record: KeyRecord | None = None,
        warnings: tuple[str, ...] = (),
    ) -> KeyTestResult:
        return KeyTestResult(
            status=status,
            domain=domain,
            selector=selector,
            name=name,
            message=message,
            record=record,
            warnings=warnings,
            dnssec=dnssec,
            nameserver=nameserver,
        )

    try:
        answer = resolver.txt_dnssec(name)
    except DNSNameNotFound:
        return result(KeyTestStatus.NO_RECORD, f"no key record: {name} does not exist (NXDOMAIN)")
    except DNSError as exc:
        return result(KeyTestStatus.DNS_ERROR, f"DNS lookup failed: {exc}")
    records = list(answer.records)
    if records:
        dnssec, nameserver = answer.authenticated, answer.nameserver
    if not records:
        return result(KeyTestStatus.NO_RECORD, f"no key record: {name} has no TXT record")
    if len(records) > 1:
        return result(
            KeyTestStatus.MALFORMED,
            f"{len(records)} TXT records at {name}; publish exactly one "
            "(RFC 6376 §3.6.2.2 lets a verifier use any of them)",
        )
    try:
        record = parse_key_record(records[0])
    except KeyRecordError as exc:
        return result(KeyTestStatus.MALFORMED, f"malformed key record at {name}: {exc}")
    if record.revoked:
        return result(
            KeyTestStatus.REVOKED, f"key record at {name} is revoked (empty p=)", record=record
        )
    try:
        public = record.public_key()
    except KeyRecordError as exc:
        return result(
            KeyTestStatus.MALFORMED, f"malformed key record at {name}: {exc}", record=record
        )
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_BITS:
        return result(
            KeyTestStatus.MALFORMED,
            f"key record at {name} holds a {public.key_size}-bit RSA key; verifiers reject "
            f"keys under {MIN_RSA_BITS} bits (RFC 8301 §3.2)",
            record=record,
        )
    if not record.allows_email:
        return result(
            KeyTestStatus.MISMATCH,
            f"key record at {name} has s={':'.join(record.service_types)}, "
            "which excludes email (needs s=email or s=*)",
            record=record,
        )
    if not record.allows_hash(SIGNING_HASH):
        hashes = ":".join(record.hash_algorithms or ())
        return result(
            KeyTestStatus.MISMATCH,
            f"key record at {name} has h={hashes}, which excludes {SIGNING_HASH}, "
            "the hash authmilter signs with (RFC 8301)",
            record=record,
        )
    warnings: list[str] = []
    if private_key is not None:
        if record.key_type is not private_key.algorithm:
            return result(
                KeyTestStatus.MISMATCH,
                f"key record at {name} is k={record.key_type.value}, but the private key "
                f"{private_key.source} is {private_key.algorithm.value}",
                record=record,
            )
        if not private_key.matches(public):
            return result(
                KeyTestStatus.MISMATCH,
                f"the public key at {name} does not match the private key {private_key.source}",
                record=record,
            )
        if private_key.algorithm is KeyAlgorithm.RSA and private_key.bits < RECOMMENDED_RSA_BITS:
            warnings.append(
                f"{private_key.bits}-bit RSA key; RFC 8301 §3.2 recommends at least "
                f"{RECOMMENDED_RSA_BITS}"
            )
    if record.testing:
        warnings.append(f"key record at {name} has t=y: verifiers treat the domain as testing DKIM")
        return result(
            KeyTestStatus.TESTING, "key OK (testing mode)", record=record, warnings=tuple(warnings)
        )
    return result(KeyTestStatus.OK, "key OK", record=record, warnings=tuple(warnings))


# pytest would collect a module-level function named test_*: mark it as not a test.
test_key.__test__ = False  # type: ignore[attr-defined]
