"""DKIM key material: private key formats and safety, key records, the genkey record layout."""

from __future__ import annotations

import base64
import grp
import os
import pwd
import re
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from authmilter.errors import KeyMaterialError
from authmilter.keys import (
    KeyAlgorithm,
    KeyRecord,
    KeyRecordError,
    PrivateKey,
    bind_txt,
    dkim_qp_decode,
    dkim_qp_encode,
    generate_private_key,
    key_owners,
    key_record_text,
    load_private_key,
    parse_key_record,
    parse_private_key,
    unsafe_key_file_reason,
)
from authmilter.resolver import Resolver
from authmilter.taglist import parse_tag_list
from dnsserver import NsdServer, make_zone

GENKEY = "/usr/sbin/opendkim-genkey"
NsdFactory = Callable[[Mapping[str, str]], NsdServer]


# -- helpers ----------------------------------------------------------------------------------


def zone_strings(bind_text: str) -> list[str]:
    """The quoted character-strings of a zone-file TXT stub, unescaped, in order."""
    raw = re.findall(r'"((?:[^"\\]|\\.)*)"', bind_text)
    return [re.sub(r"\\(.)", r"\1", s) for s in raw]


def opendkim_genkey(directory: Path, *args: str) -> None:
    """Run the real opendkim-genkey; fail (not skip) when it is missing."""
    if not os.access(GENKEY, os.X_OK):
        pytest.fail(f"{GENKEY} is missing: run `make test` (installs opendkim-tools)")
    subprocess.run([GENKEY, "-D", str(directory), *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def rsa_key() -> PrivateKey:
    return generate_private_key(KeyAlgorithm.RSA, 2048)


@pytest.fixture(scope="module")
def ed_key() -> PrivateKey:
    return generate_private_key(KeyAlgorithm.ED25519)


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
        fmt: serialization.PrivateFormat) -> bytes:  # fmt: skip
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def der(key: rsa.RSAPrivateKey, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())


def write_key(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


# -- private key formats ----------------------------------------------------------------------


def test_parse_pkcs1_pem_rsa(rsa_key: PrivateKey) -> None:
    assert isinstance(rsa_key.key, rsa.RSAPrivateKey)
    data = pem(rsa_key.key, serialization.PrivateFormat.TraditionalOpenSSL)
    assert data.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    key = parse_private_key(data, source="k1")
    assert (key.algorithm, key.bits, key.source) == (KeyAlgorithm.RSA, 2048, "k1")
    assert key.public_p() == rsa_key.public_p()


def test_parse_pkcs8_pem_rsa(rsa_key: PrivateKey) -> None:
    assert isinstance(rsa_key.key, rsa.RSAPrivateKey)
    data = pem(rsa_key.key, serialization.PrivateFormat.PKCS8)
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert parse_private_key(data, source="x").public_p() == rsa_key.public_p()


def test_parse_pkcs8_pem_ed25519(ed_key: PrivateKey) -> None:
    assert isinstance(ed_key.key, ed25519.Ed25519PrivateKey)
    key = parse_private_key(pem(ed_key.key, serialization.PrivateFormat.PKCS8), source="x")
    assert (key.algorithm, key.bits) == (KeyAlgorithm.ED25519, 256)
    assert key.public_p() == ed_key.public_p()


def test_parse_dkimpy_base64_ed25519_seed_with_newline(ed_key: PrivateKey) -> None:
    seed_b64 = ed_key.dkimpy_private()
    assert len(base64.b64decode(seed_b64)) == 32
    key = parse_private_key(seed_b64 + b"\n", source="seed")
    assert key.algorithm is KeyAlgorithm.ED25519
    assert key.public_p() == ed_key.public_p()


def test_parse_nacl_seed_plus_public_ed25519(ed_key: PrivateKey) -> None:
    raw = base64.b64decode(ed_key.dkimpy_private()) + base64.b64decode(ed_key.public_p())
    key = parse_private_key(base64.b64encode(raw), source="nacl")
    assert key.public_p() == ed_key.public_p()
    wrong = raw[:32] + bytes(32)
    with pytest.raises(KeyMaterialError, match="nacl: .*do not belong together"):
        parse_private_key(base64.b64encode(wrong), source="nacl")


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8]
)
def test_parse_inline_base64_der_rsa_without_armour(
    rsa_key: PrivateKey, fmt: serialization.PrivateFormat
) -> None:
    assert isinstance(rsa_key.key, rsa.RSAPrivateKey)
    b64 = base64.b64encode(der(rsa_key.key, fmt))
    key = parse_private_key(b64, source="inline")
    assert key.public_p() == rsa_key.public_p()
    wrapped = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    assert parse_private_key(wrapped, source="inline").public_p() == rsa_key.public_p()


def test_parse_real_opendkim_genkey_private_key(tmp_path: Path) -> None:
    opendkim_genkey(tmp_path, "-s", "real", "-d", "example.test")
    key = load_private_key(tmp_path / "real.private")
    assert (key.algorithm, key.bits) == (KeyAlgorithm.RSA, 2048)
    record = "".join(zone_strings((tmp_path / "real.txt").read_text()))
    assert parse_key_record(record).public_key_data == base64.b64decode(key.public_p())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "key data is empty"),
        (b"   \n", "key data is empty"),
        (b"hello, world", "neither PEM .* nor base64"),
        (base64.b64encode(b"not a key at all, just bytes"), r"not a DER private key"),
        (b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
         "cannot parse the PEM private key"),
    ],
)  # fmt: skip
def test_unusable_key_data_is_a_key_material_error_naming_the_source(
    data: bytes, message: str
) -> None:
    with pytest.raises(KeyMaterialError, match=f"^/keys/x.private: .*{message}") as exc:
        parse_private_key(data, source="/keys/x.private")
    # no cryptography/binascii traceback chained to it
    assert exc.value.__cause__ is None
    assert exc.value.__context__ is None or exc.value.__suppress_context__


def test_encrypted_public_and_unsupported_keys_are_refused(rsa_key: PrivateKey) -> None:
    assert isinstance(rsa_key.key, rsa.RSAPrivateKey)
    encrypted = rsa_key.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(KeyMaterialError, match="encrypted"):
        parse_private_key(encrypted, source="enc")
    public = rsa_key.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeyMaterialError, match="public key, not a private key"):
        parse_private_key(public, source="pub")
    ec_pem = pem(ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8)
    with pytest.raises(KeyMaterialError, match="unsupported key type .*rsa .*ed25519"):
        parse_private_key(ec_pem, source="ec")


def test_pem_forms_round_trip(rsa_key: PrivateKey, ed_key: PrivateKey) -> None:
    assert rsa_key.pem().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert ed_key.pem().startswith(b"-----BEGIN PRIVATE KEY-----")
    for key in (rsa_key, ed_key):
        assert parse_private_key(key.pem(), source="x").public_p() == key.public_p()


def test_public_p_is_spki_for_rsa_and_raw_for_ed25519(
    rsa_key: PrivateKey, ed_key: PrivateKey
) -> None:
    spki = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert base64.b64decode(rsa_key.public_p()) == spki
    assert rsa_key.public_p().startswith("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA")
    assert len(base64.b64decode(ed_key.public_p())) == 32


def test_generate_refuses_rsa_under_1024_bits() -> None:
    with pytest.raises(ValueError, match="RFC 8301"):
        generate_private_key(KeyAlgorithm.RSA, 512)
    assert generate_private_key("rsa", 1024).bits == 1024


# -- key file safety --------------------------------------------------------------------------


def test_key_file_mode_0600_loads(tmp_path: Path, rsa_key: PrivateKey) -> None:
    path = write_key(tmp_path / "sel.private", rsa_key.pem(), 0o600)
    assert load_private_key(path).source == str(path)
    assert unsafe_key_file_reason(str(path)) is None


def test_world_readable_key_is_refused_naming_file_and_mode(
    tmp_path: Path, rsa_key: PrivateKey
) -> None:
    path = write_key(tmp_path / "sel.private", rsa_key.pem(), 0o644)
    with pytest.raises(KeyMaterialError) as exc:
        load_private_key(path)
    assert str(exc.value) == (
        f"{path}: mode 0644 is readable by group/others; chmod 600 it or set RequireSafeKeys "
        "false"
    )


def test_world_writable_key_is_refused(tmp_path: Path, rsa_key: PrivateKey) -> None:
    path = write_key(tmp_path / "sel.private", rsa_key.pem(), 0o602)
    with pytest.raises(KeyMaterialError, match="mode 0602 is writable by group/others"):
        load_private_key(path)


def test_unsafe_key_loads_when_safety_is_off(tmp_path: Path, rsa_key: PrivateKey) -> None:
    path = write_key(tmp_path / "sel.private", rsa_key.pem(), 0o666)
    assert load_private_key(path, require_safe=False).bits == 2048


def _group_of_nobody_else() -> grp.struct_group:
    me = os.geteuid()
    me_name = pwd.getpwuid(me).pw_name
    for group in grp.getgrall():
        members = [m for m in group.gr_mem if m not in (me_name, "root")]
        primary = [
            u for u in pwd.getpwall() if u.pw_gid == group.gr_gid and u.pw_uid not in (0, me)
        ]
        if not members and not primary:
            return group
    pytest.fail("no group without other users in the group database")


@pytest.mark.parametrize("mode", [0o640, 0o620, 0o604])
def test_group_or_other_access_is_refused_even_for_a_group_of_our_own(
    tmp_path: Path, rsa_key: PrivateKey, mode: int
) -> None:
    # Stricter than OpenDKIM, which accepts group access when nobody else is in the group:
    # a key must not become readable by adding a user to a group.
    group = _group_of_nobody_else()
    path = write_key(tmp_path / "sel.private", rsa_key.pem(), mode)
    os.chown(path, os.geteuid(), group.gr_gid)
    with pytest.raises(KeyMaterialError) as exc:
        load_private_key(path)
    assert str(exc.value).startswith(f"{path}: mode {mode:04o} is ")
    assert "by group/others; chmod 600 it" in str(exc.value)


def test_key_owned_by_another_user_is_refused(tmp_path: Path, rsa_key: PrivateKey) -> None:
    other = next(u for u in pwd.getpwall() if u.pw_uid not in (0, os.geteuid()))
    path = write_key(tmp_path / "sel.private", rsa_key.pem(), 0o600)
    os.chown(path, other.pw_uid, -1)
    with pytest.raises(KeyMaterialError, match=f"owned by uid {other.pw_uid}"):
        load_private_key(path)


def test_key_under_a_world_writable_directory_is_refused(
    tmp_path: Path, rsa_key: PrivateKey
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    path = write_key(shared / "sel.private", rsa_key.pem(), 0o600)
    with pytest.raises(KeyMaterialError, match=f"directory {shared} .* writable by others"):
        load_private_key(path)


def test_sticky_world_writable_directory_is_accepted(tmp_path: Path, rsa_key: PrivateKey) -> None:
    shared = tmp_path / "sticky"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    path = write_key(shared / "sel.private", rsa_key.pem(), 0o600)
    assert load_private_key(path).bits == 2048


def test_missing_or_odd_key_files_give_the_os_reason(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match=r"nope.private: .*No such file or directory"):
        load_private_key(tmp_path / "nope.private")
    with pytest.raises(KeyMaterialError, match="not a regular file"):
        load_private_key(tmp_path)
    fifo = tmp_path / "fifo.private"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyMaterialError, match="fifo.private: not a regular file"):
        load_private_key(fifo)


def test_garbage_key_file_names_the_file(tmp_path: Path) -> None:
    path = write_key(tmp_path / "junk.private", b"this is not a key\n")
    with pytest.raises(KeyMaterialError, match=f"^{path}: not a private key"):
        load_private_key(path)


# -- key records ------------------------------------------------------------------------------


def test_minimal_record_takes_the_rfc_defaults(rsa_key: PrivateKey) -> None:
    record = parse_key_record(f"p={rsa_key.public_p()}")
    assert record.key_type is KeyAlgorithm.RSA
    assert record.version is None
    assert record.hash_algorithms is None
    assert record.service_types == ("*",)
    assert record.flags == ()
    assert not record.revoked and not record.testing and not record.strict_subdomains
    assert record.allows_hash("sha256") and record.allows_email
    assert rsa_key.matches(record.public_key())


def test_record_tolerates_whitespace_and_folding(rsa_key: PrivateKey) -> None:
    p = rsa_key.public_p()
    text = f" v = DKIM1 ;\r\n\th = sha1 : sha256 ; k=rsa;\tp={p[:100]}\r\n {p[100:200]} {p[200:]} ;"
    record = parse_key_record(text.encode())
    assert record.hash_algorithms == ("sha1", "sha256")
    assert rsa_key.matches(record.public_key())


def test_record_keeps_unknown_tags_and_flags() -> None:
    record = parse_key_record("v=DKIM1; g=*; x_future=1; t=y:s:zz; s=email:tlsrpt; p=")
    assert dict(record.tags)["x_future"] == "1"
    assert record.flags == ("y", "s", "zz")
    assert record.testing and record.strict_subdomains
    assert record.service_types == ("email", "tlsrpt") and record.allows_email


def test_empty_p_is_revoked() -> None:
    record = parse_key_record("v=DKIM1; k=rsa; p=")
    assert record.revoked
    with pytest.raises(KeyRecordError, match="revoked"):
        record.public_key()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("v=DKIM1; p=abc; p=abc", "duplicate tag p="),
        ("v=DKIM2; p=", "v=DKIM2 is not DKIM1"),
        ("k=rsa; v=DKIM1; p=", "v= must be the first tag"),
        ("v=DKIM1; k=rsa", "missing p="),
        ("v=DKIM1; p=not*base64!", "p= is not valid base64"),
        ("v=DKIM1; p=QUJDR", "p= is not valid base64"),
        ("v=DKIM1; k=dsa; p=", "unknown key type k=dsa"),
        ("v=DKIM1; k rsa; p=", "tag-spec 'k rsa' has no '='"),
        ("v=DKIM1; 9k=rsa; p=", "invalid tag name '9k'"),
        ("v=DKIM1; h=sha256:; p=", "h= has an empty item"),
        ("", "empty"),
    ],
)
def test_bad_records_raise_precise_key_record_errors(text: str, message: str) -> None:
    with pytest.raises(KeyRecordError, match=re.escape(message)) as exc:
        parse_key_record(text)
    assert isinstance(exc.value, KeyMaterialError)


def test_unusable_public_keys_raise_key_record_error(ed_key: PrivateKey) -> None:
    with pytest.raises(KeyRecordError, match="32 raw bytes"):
        parse_key_record("k=ed25519; p=QUJD").public_key()
    with pytest.raises(KeyRecordError, match="not a DER RSA public key"):
        parse_key_record("k=rsa; p=QUJD").public_key()
    # an ed25519 key published as k=rsa
    with pytest.raises(KeyRecordError):
        parse_key_record(f"k=rsa; p={ed_key.public_p()}").public_key()


def test_bare_pkcs1_rsa_public_key_in_p_is_accepted(rsa_key: PrivateKey) -> None:
    pkcs1 = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    record = parse_key_record(f"v=DKIM1; p={base64.b64encode(pkcs1).decode()}")
    assert rsa_key.matches(record.public_key())


def test_tag_list_allows_trailing_and_doubled_semicolons() -> None:
    assert parse_tag_list("a=1;; b = 2 x ;") == [("a", "1"), ("b", "2 x")]


_WS = st.sampled_from(["", " ", "\t", "\r\n ", " \r\n\t"])


@settings(max_examples=60, deadline=None)
@given(ws=st.lists(_WS, min_size=12, max_size=12))
def test_any_folding_whitespace_parses_the_same(ws: list[str]) -> None:
    key_b64 = "MCowBQYDK2VwAyEA"  # any base64 will do for syntax
    text = (
        f"{ws[0]}v{ws[1]}={ws[2]}DKIM1{ws[3]};{ws[4]}h{ws[5]}={ws[6]}sha256{ws[7]};"
        f"{ws[8]}p{ws[9]}={ws[10]}{key_b64[:8]}{ws[11]}{key_b64[8:]}"
    )
    record = parse_key_record(text)
    assert record.version == "DKIM1"
    assert record.hash_algorithms == ("sha256",)
    assert record.public_key_data == base64.b64decode(key_b64)


@settings(max_examples=100, deadline=None)
@given(note=st.text(max_size=40))
def test_note_quoted_printable_round_trips(note: str) -> None:
    encoded = dkim_qp_encode(note)
    assert not re.search(r"[\s;]", encoded)
    assert dkim_qp_decode(encoded) == note


# -- key_record_text and bind_txt -------------------------------------------------------------


def test_record_text_writes_tags_in_opendkim_genkey_order(rsa_key: PrivateKey) -> None:
    text = key_record_text(
        rsa_key,
        hash_algorithms=["sha256"],
        restrict_email=True,
        no_subdomains=True,
        testmode=True,
        note="hello world",
    )
    assert text == (
        f"v=DKIM1; n=hello=20world; h=sha256; k=rsa; t=y:s; s=email; p={rsa_key.public_p()}"
    )
    assert key_record_text(rsa_key) == f"v=DKIM1; k=rsa; p={rsa_key.public_p()}"


@pytest.mark.parametrize("which", ["rsa", "ed25519"])
def test_record_text_round_trips_to_the_private_key(
    which: str, rsa_key: PrivateKey, ed_key: PrivateKey
) -> None:
    key = rsa_key if which == "rsa" else ed_key
    record = parse_key_record(
        key_record_text(key, hash_algorithms=["sha256"], testmode=True, note="n; =x")
    )
    assert record.key_type is key.algorithm
    assert key.matches(record.public_key())
    assert record.testing and record.hash_algorithms == ("sha256",) and record.notes == "n; =x"


@pytest.mark.parametrize(("bits", "flags"), [(2048, ()), (1024, ("-a", "-t", "-S", "-r"))])
def test_bind_txt_matches_opendkim_genkey_byte_for_byte(
    tmp_path: Path, bits: int, flags: tuple[str, ...]
) -> None:
    opendkim_genkey(tmp_path, "-b", str(bits), "-s", "sel", "-d", "example.com", *flags)
    key = load_private_key(tmp_path / "sel.private")
    record = key_record_text(
        key,
        hash_algorithms=["sha256"],
        testmode="-t" in flags,
        no_subdomains="-S" in flags,
        restrict_email="-r" in flags,
    )
    ours = bind_txt("sel", "example.com", record, append_domain="-a" in flags)
    assert ours == (tmp_path / "sel.txt").read_text()


@pytest.mark.parametrize("bits", [1024, 2048, 4096])
def test_bind_txt_strings_fit_255_and_join_to_the_record(bits: int) -> None:
    key = generate_private_key(KeyAlgorithm.RSA, bits)
    record = key_record_text(key, note="x" * 300, hash_algorithms=["sha256"])
    text = bind_txt("s2024", "example.com", record, append_domain=True)
    strings = zone_strings(text)
    assert all(len(s) <= 255 for s in strings)
    assert "".join(strings) == record
    assert text.startswith('s2024._domainkey.example.com.\tIN\tTXT\t( "v=DKIM1; ')
    assert text.endswith(" )  ; ----- DKIM key s2024 for example.com\n")


def test_bind_txt_for_ed25519_is_two_strings(ed_key: PrivateKey) -> None:
    text = bind_txt("ed", "example.com", key_record_text(ed_key), append_domain=False)
    assert text == (
        'ed._domainkey\tIN\tTXT\t( "v=DKIM1; k=ed25519; "\n'
        f'\t  "p={ed_key.public_p()}" )  ; ----- DKIM key ed for example.com\n'
    )


# -- the record really verifies signatures ----------------------------------------------------

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: key test\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <key-test@example.test>\r\n"
    b"\r\n"
    b"Hello.\r\n"
)


def _sign(key: PrivateKey) -> bytes:
    algo = b"ed25519-sha256" if key.algorithm is KeyAlgorithm.ED25519 else b"rsa-sha256"
    signature: bytes = dkim.sign(
        MESSAGE, b"sel", b"example.test", key.dkimpy_private(), signature_algorithm=algo
    )
    return signature + MESSAGE


@pytest.mark.parametrize("which", ["rsa", "ed25519"])
def test_dkimpy_verifies_with_the_published_record(
    which: str, rsa_key: PrivateKey, ed_key: PrivateKey
) -> None:
    key = rsa_key if which == "rsa" else ed_key
    other = generate_private_key(key.algorithm)
    asked: list[bytes] = []

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        asked.append(name)
        return key_record_text(key, hash_algorithms=["sha256"]).encode()

    def wrong_dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return key_record_text(other).encode()

    signed = _sign(key)
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert asked == [b"sel._domainkey.example.test."]
    assert not dkim.verify(signed, dnsfunc=wrong_dnsfunc)


def test_dkimpy_verifies_through_our_resolver_and_nsd(
    nsd_server: NsdFactory, rsa_key: PrivateKey, ed_key: PrivateKey
) -> None:
    zone = make_zone(
        "example.test",
        raw=bind_txt("sel", "example.test", key_record_text(rsa_key), append_domain=False)
        + bind_txt("ed", "example.test", key_record_text(ed_key), append_domain=True),
    )
    server = nsd_server({"example.test": zone})
    resolver = Resolver([server.nameserver], timeout=2)
    assert dkim.verify(_sign(rsa_key), dnsfunc=resolver.dkimpy_dnsfunc)
    ed_signed = dkim.sign(
        MESSAGE, b"ed", b"example.test", ed_key.dkimpy_private(),
        signature_algorithm=b"ed25519-sha256",
    ) + MESSAGE  # fmt: skip
    assert dkim.verify(ed_signed, dnsfunc=resolver.dkimpy_dnsfunc)
    assert not dkim.verify(_sign(ed_key), dnsfunc=resolver.dkimpy_dnsfunc)  # sel holds RSA


def test_key_record_is_a_frozen_value() -> None:
    record = parse_key_record("p=")
    with pytest.raises(AttributeError):
        record.flags = ("y",)  # type: ignore[misc]
    assert isinstance(record, KeyRecord)


def test_a_key_of_the_user_id_user_in_its_0700_folder_is_safe_only_for_that_user(
    tmp_path: Path, rsa_key: PrivateKey
) -> None:
    """Debian's /etc/dkimkeys: the folder and the key belong to the milter's user, 0700/0600.
    Safe when that user is trusted (UserID), refused otherwise, and the refusal says to chown,
    never to chmod a file that is already 0600."""
    nobody = pwd.getpwnam("nobody")
    folder = tmp_path / "dkimkeys"
    folder.mkdir(mode=0o700)
    path = write_key(folder / "sel.private", rsa_key.pem(), 0o600)
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    trusted = key_owners([nobody.pw_uid])
    assert unsafe_key_file_reason(str(path), trusted) is None
    assert load_private_key(path, trusted=trusted).bits == rsa_key.bits

    with pytest.raises(KeyMaterialError) as exc:
        load_private_key(path)  # root and the running user only
    message = str(exc.value)
    assert "owned by uid" in message and "(nobody)" in message and "chown" in message
    assert "chmod" not in message

    os.chown(path, 0, 0)  # a root-owned key in the user's folder: the folder is the problem
    with pytest.raises(KeyMaterialError) as exc:
        load_private_key(path)
    assert f"directory {folder} is writable by its owner uid {nobody.pw_uid} (nobody)" in str(
        exc.value)  # fmt: skip
    assert "chmod" not in str(exc.value)
    assert load_private_key(path, trusted=trusted).bits == rsa_key.bits


def test_a_refused_open_names_the_user_that_read_it() -> None:
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # a child that is not root reads a file only root may read
        code = 1
        try:
            os.setuid(nobody.pw_uid)
            load_private_key("/etc/shadow")
        except KeyMaterialError as e:
            code = 0 if ("Permission denied" in str(e) and "(nobody)" in str(e)
                         and "start it as root" in str(e)) else 2  # fmt: skip
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
