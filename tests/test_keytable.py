"""KeyTable / SigningTable: which keys sign which From address, and refusing unusable keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from authmilter.config import Config
from authmilter.errors import ConfigError, KeyMaterialError
from authmilter.keytable import KeyStore, load_key_entries


def rsa_pem(path: Path, mode: int = 0o600, bits: int = 1024) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))  # fmt: skip
    os.chmod(path, mode)
    return path


def ed25519_pem(path: Path) -> Path:
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    os.chmod(path, 0o600)
    return path


@pytest.fixture()
def keydir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    d.mkdir()
    for name in ("exact", "host", "userparent", "parent", "userstar", "star", "rsa"):
        rsa_pem(d / f"{name}.private")
    ed25519_pem(d / "ed.private")
    return d


def store(tmp_path: Path, keytable: str, signingtable: str, extra: str = "",
          st_type: str = "file") -> KeyStore:  # fmt: skip
    (tmp_path / "key.table").write_text(keytable)
    (tmp_path / "signing.table").write_text(signingtable)
    cfg = Config.from_text(
        f"KeyTable file:{tmp_path}/key.table\n"
        f"SigningTable {st_type}:{tmp_path}/signing.table\n{extra}")
    return KeyStore.from_config(cfg)


def names(ks: KeyStore, address: str) -> list[str]:
    return [k.keyname for k in ks.keys_for(address)]


def test_file_signing_table_follows_opendkim_lookup_order(tmp_path: Path, keydir: Path) -> None:
    kt = "".join(f"{n} example.com:{n}:{keydir}/{n}.private\n"
                 for n in ("exact", "host", "userparent", "parent", "userstar", "star"))
    st_lines = {
        "exact": "alice@mail.example.com exact",
        "host": "mail.example.com host",
        "userparent": "alice@.example.com userparent",
        "parent": ".example.com parent",
        "userstar": "alice@* userstar",
        "star": "* star",
    }
    order = ["exact", "host", "userparent", "parent", "userstar", "star"]
    for i, expected in enumerate(order):
        # Each round drops the more specific entries: the next one in OpenDKIM's order must win.
        st = "\n".join(st_lines[n] for n in reversed(order[i:])) + "\n"
        ks = store(tmp_path, kt, st)
        assert names(ks, "alice@mail.example.com") == [expected], st


def test_parent_domain_entries_match_every_level(tmp_path: Path, keydir: Path) -> None:
    ks = store(tmp_path, f"k example.com:s:{keydir}/rsa.private\n", ".example.com k\n")
    assert names(ks, "bob@a.b.example.com") == ["k"]
    assert names(ks, "bob@example.com") == []  # .example.com is a parent entry, not the domain
    assert names(ks, "bob@example.org") == []


def test_refile_first_match_in_file_order(tmp_path: Path, keydir: Path) -> None:
    kt = (f"first example.com:s1:{keydir}/exact.private\n"
          f"second example.com:s2:{keydir}/host.private\n")  # fmt: skip
    ks = store(tmp_path, kt, "*@example.com first\n*@example.com second\n", st_type="refile")
    assert names(ks, "carol@example.com") == ["first"]
    assert names(ks, "carol@sub.example.com") == []


def test_multiple_signatures_applies_every_match_rsa_and_ed25519(tmp_path: Path,
                                                                 keydir: Path) -> None:
    kt = (f"rsa example.com:rsa2026:{keydir}/rsa.private\n"
          f"ed example.com:ed2026:{keydir}/ed.private\n")  # fmt: skip
    ks = store(tmp_path, kt, "*@example.com rsa\n*@example.com ed\n",
               "MultipleSignatures yes\n", st_type="refile")  # fmt: skip
    keys = ks.keys_for("dave@example.com")
    assert [(k.selector, k.key.algorithm.value) for k in keys] == [
        ("rsa2026", "rsa"), ("ed2026", "ed25519")]


def test_percent_keyname_and_domain_become_the_from_domain(tmp_path: Path, keydir: Path) -> None:
    for dom in ("example.com", "example.net"):
        rsa_pem(keydir / f"{dom}.private")
    kt = (f"example.com %:sel:{keydir}/%.private\n"
          f"example.net %:sel:{keydir}/%.private\n")  # fmt: skip
    ks = store(tmp_path, kt, "* %\n")
    (key,) = ks.keys_for("erin@example.net")
    assert (key.keyname, key.domain, key.selector) == ("example.net", "example.net", "sel")
    assert key.key.source.endswith("example.net.private")


def test_signer_identity_after_the_key_name(tmp_path: Path, keydir: Path) -> None:
    ks = store(tmp_path, f"k example.com:s:{keydir}/rsa.private\n", "example.com k:@%\n")
    (key,) = ks.keys_for("frank@example.com")
    assert key.identity == "@example.com"


def test_unsafe_key_file_is_refused_naming_file_mode_and_table_line(tmp_path: Path,
                                                                     keydir: Path) -> None:
    rsa_pem(keydir / "open.private", mode=0o644)
    with pytest.raises(ConfigError) as exc:
        store(tmp_path, f"# keys\nk example.com:s:{keydir}/open.private\n", "* k\n")
    msg = str(exc.value)
    assert msg.startswith(f"{tmp_path}/key.table:2: ")
    assert f"{keydir}/open.private" in msg and "0644" in msg


def test_unsafe_key_is_accepted_when_require_safe_keys_is_off(tmp_path: Path,
                                                              keydir: Path) -> None:
    rsa_pem(keydir / "open.private", mode=0o644)
    ks = store(tmp_path, f"k example.com:s:{keydir}/open.private\n", "* k\n",
               "RequireSafeKeys false\n")  # fmt: skip
    assert names(ks, "gina@example.com") == ["k"]


def test_missing_key_file_names_the_table_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        store(tmp_path, f"k example.com:s:{tmp_path}/nope.private\n", "* k\n")
    assert str(exc.value).startswith(f"{tmp_path}/key.table:1: ")
    assert "nope.private" in str(exc.value)


def test_malformed_keytable_value_is_an_error_with_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        store(tmp_path, "\n\nk example.com:onlytwo\n", "* k\n")
    assert str(exc.value) == (f"{tmp_path}/key.table:3: KeyTable entry 'k': value must be "
                              "domain:selector:keyfile, got 'example.com:onlytwo'")  # fmt: skip


def test_dangling_signing_table_names_are_listed(tmp_path: Path, keydir: Path) -> None:
    ks = store(tmp_path, f"k example.com:s:{keydir}/rsa.private\n", "a.example k\nb.example x\n")
    (dangling,) = ks.dangling_names()
    assert dangling[0] == "x" and str(dangling[1]) == f"{tmp_path}/signing.table:2"


def test_single_key_mode_with_subdomains(tmp_path: Path, keydir: Path) -> None:
    base = f"Domain example.com, example.org\nKeyFile {keydir}/rsa.private\nSelector s1\n"
    ks = KeyStore.from_config(Config.from_text(base))
    assert [k.domain for k in ks.keys_for("h@EXAMPLE.org")] == ["example.org"]
    assert ks.keys_for("h@mail.example.org") == []
    ks_sub = KeyStore.from_config(Config.from_text(base + "SubDomains yes\n"))
    (key,) = ks_sub.keys_for("h@mail.example.org")
    assert (key.domain, key.selector) == ("example.org", "s1")


def test_load_key_entries_for_testkey(tmp_path: Path, keydir: Path) -> None:
    (tmp_path / "key.table").write_text(f"k example.com:s:{keydir}/rsa.private\n")
    (tmp_path / "signing.table").write_text("* k\n")
    conf = tmp_path / "a.conf"
    conf.write_text(f"KeyTable file:{tmp_path}/key.table\nSigningTable {tmp_path}/signing.table\n")
    (entry,) = load_key_entries(str(conf))
    assert (entry.name, entry.domain, entry.selector) == ("k", "example.com", "s")
    assert entry.key_source == f"{keydir}/rsa.private"


def test_percent_key_files_are_read_when_the_store_is_built_not_per_message(
        tmp_path: Path) -> None:  # fmt: skip
    """A `%` path is read for every file it matches, at start (and at each reload, which
    builds a new store), under the same safety rule as other keys; a domain whose file came
    later gets a clear error until the reload."""
    d = tmp_path / "pk"
    d.mkdir()
    (d / "example.com").mkdir()
    rsa_pem(d / "example.com" / "sel.private")
    (d / "Example.NET").mkdir()
    rsa_pem(d / "Example.NET" / "sel.private")
    (d / "other").mkdir()  # matches the pattern, but no key file in it
    kt = f"k %:sel:{d}/%/sel.private\n"
    ks = store(tmp_path, kt, "* k\n")
    assert ks.keys_for("a@example.com")[0].key.source == f"{d}/example.com/sel.private"
    assert ks.keys_for("b@example.net")[0].key.source == f"{d}/Example.NET/sel.private"
    (d / "example.org").mkdir()
    rsa_pem(d / "example.org" / "sel.private")
    with pytest.raises(KeyMaterialError, match=r"example\.org/sel\.private: no such key file "
                       r"when the configuration was last read .* then reload"):  # fmt: skip
        ks.keys_for("c@example.org")
    assert store(tmp_path, kt, "* k\n").keys_for("c@example.org")[0].domain == "example.org"
    (d / "example.org" / "sel.private").chmod(0o640)
    with pytest.raises(ConfigError, match=r"key\.table:1: .*example\.org/sel\.private: mode 0640"):
        store(tmp_path, kt, "* k\n")


def test_percent_twice_in_a_path_means_the_same_domain(tmp_path: Path) -> None:
    d = tmp_path / "pk"
    d.mkdir()
    rsa_pem(d / "example.com-example.com.private")
    rsa_pem(d / "example.com-example.net.private")  # two different parts: not a match
    ks = store(tmp_path, f"k %:sel:{d}/%-%.private\n", "* k\n")
    assert ks.keys_for("a@example.com")[0].key.source.endswith("example.com-example.com.private")
    with pytest.raises(KeyMaterialError, match="no such key file"):
        ks.keys_for("a@example.net")
