"""Drop-in decisions (issue 10): the user's unchanged OpenDKIM/OpenDMARC/policyd-spf files give
the decisions the anchors make, and every directive called supported is honoured.

Pipeline scenarios reuse the hostile-input world of :mod:`test_hostile_input` (from
:mod:`helpers`): ``bank.example`` publishes ``p=reject`` and SPF for 203.0.113.5 only, and holds
a DKIM key ``sel``; mail comes from 198.51.100.25, a forwarder as far as bank.example's SPF is
concerned.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from authmilter import cli
from authmilter.config import (
    DIRECTIVES,
    Config,
    Support,
    build_config,
    effective_lines,
    load_config,
    load_split,
    read_settings_text,
)
from authmilter.pipeline import AddHeader, Connection, Context, DeleteHeader, Verdict
from helpers import (
    AID,
    ATTACKER_IP,
    BANK,
    HELO,
    QID,
    Keys,
    World,
    added,
    compose,
    dkim_sign,
    dmarc_of,
    keys,
    milter_view,
    our_ar,
    pieces,
    run,
    spf_of,
    world,
)

SRC = Path(__file__).resolve().parents[1] / "milter" / "authmilter"
__all__ = ["keys", "world"]  # the hostile-input fixtures (tests/helpers.py), used by name


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- 1. SPF rejects only when the user asked for it ---------------------------------------------


def test_spf_never_rejects_by_default_in_a_merged_file() -> None:
    cfg = Config.from_text("Mode v\n")
    assert (cfg.mail_from_reject, cfg.helo_reject) == ("False", "False")


def test_opendkim_and_opendmarc_files_alone_never_reject_on_spf(tmp_path: Path) -> None:
    dkim = write(tmp_path, "opendkim.conf", "Syslog yes\nMode sv\n")
    dmarc = write(tmp_path, "opendmarc.conf", "RejectFailures true\n")
    cfg = load_split(dkim, dmarc).config
    assert (cfg.mail_from_reject, cfg.helo_reject) == ("False", "False")


def test_policyd_spf_file_brings_its_own_defaults(tmp_path: Path) -> None:
    """A policyd-spf.conf that sets neither option still means policyd-spf's Fail/Fail."""
    dkim = write(tmp_path, "opendkim.conf", "Mode v\n")
    spf = write(tmp_path, "policyd-spf.conf", "debugLevel = 1\nTestOnly = 1\n")
    loaded = load_split(dkim, None, spf)
    cfg = loaded.config
    assert (cfg.mail_from_reject, cfg.helo_reject) == ("Fail", "Fail")
    assert cfg.location("mail_from_reject") is None  # a default, with its reason
    assert cfg.default_notes["mail_from_reject"] == f"policyd-spf's default, as {spf} is given"


def test_an_explicit_spf_option_applies_in_any_file(tmp_path: Path) -> None:
    dkim = write(tmp_path, "opendkim.conf", "Mode v\nMail_From_reject Softfail\n")
    dmarc = write(tmp_path, "opendmarc.conf", "HELO_reject = SPF_Not_Pass\n")
    cfg = load_split(dkim, dmarc).config
    assert (cfg.mail_from_reject, cfg.helo_reject) == ("Softfail", "SPF_Not_Pass")
    spf = write(tmp_path, "policyd-spf.conf", "Mail_From_reject = False\n")
    cfg = load_split(dkim, None, spf).config
    # The OpenDKIM file's explicit value wins; policyd-spf's HELO default applies.
    assert (cfg.mail_from_reject, cfg.helo_reject) == ("Softfail", "Fail")


def test_config_test_verbose_prints_spf_enforcement_and_its_origin(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    dkim = write(tmp_path, "opendkim.conf", "Mode v\nAuthservID mx.example\n")
    spf = write(tmp_path, "policyd-spf.conf", "HELO_reject = False\n")
    code = cli.main(["config-test", "-v", "--opendkim-conf", dkim, "--policyd-spf-conf", spf])
    out = capsys.readouterr().out
    assert code == 0
    assert (f"# SPF MAIL FROM: rejects on Fail    (Mail_From_reject Fail: default "
            f"(policyd-spf's default, as {spf} is given))") in out
    assert (f"# SPF HELO: checked, never rejects or defers by itself    (HELO_reject False: "
            f"{spf}:1)") in out
    assert "# SPF rejects and defers are answered at RCPT    (SPFRejectAfterDMARC no: default)" \
        in out
    conf = write(tmp_path, "authmilter.conf", "Mode v\nAuthservID mx.example\n"
                                              "SPFRejectAfterDMARC yes\n")  # fmt: skip
    assert cli.main(["config-test", "-v", "-c", conf]) == 0
    out = capsys.readouterr().out
    assert "# SPF MAIL FROM: checked, never rejects or defers by itself    " \
           "(Mail_From_reject False: default)" in out
    assert f"dropped when DMARC passes through an aligned DKIM signature    " \
           f"(SPFRejectAfterDMARC yes: {conf}:3)" in out


def drive_to_end(ctx_world: World, conf: str, raw: bytes, *,
                 mail_from: str) -> tuple[str | None, Verdict | None]:  # fmt: skip
    """One transaction; returns the RCPT reply code (None when accepted) and the verdict."""
    conn = Connection(ctx_world.ctx(conf), hostname=None, ip=ATTACKER_IP)
    conn.set_helo(HELO)
    txn = conn.transaction()
    txn.update_macros({"i": QID})
    txn.envfrom(f"<{mail_from}>")
    reply = txn.rcpt("<user@ours.test>").reply
    if reply is not None:
        return f"{reply.code} {reply.xcode}", None
    fields, body = milter_view(raw)
    for name, value in fields:
        txn.header(name, value)
    for chunk in pieces(body):
        txn.body(chunk)
    return None, txn.eom()


REJECT_SPF = "Mail_From_reject Fail\nRejectFailures yes\n"


def test_spf_fail_of_forwarded_dkim_signed_mail_is_rejected_at_rcpt_without_the_hold(
        world: World, keys: Keys) -> None:  # fmt: skip
    raw = compose(f"ceo@{BANK}")
    signed = dkim_sign(raw, keys.bank, BANK) + raw
    code, verdict = drive_to_end(world, REJECT_SPF, signed, mail_from=f"ceo@{BANK}")
    assert code == "550 5.7.23" and verdict is None


def test_spf_reject_after_dmarc_lets_aligned_dkim_pass_through(world: World,
                                                                keys: Keys) -> None:  # fmt: skip
    raw = compose(f"ceo@{BANK}")
    signed = dkim_sign(raw, keys.bank, BANK) + raw
    code, verdict = drive_to_end(world, REJECT_SPF + "SPFRejectAfterDMARC yes\n", signed,
                                 mail_from=f"ceo@{BANK}")  # fmt: skip
    assert code is None and verdict is not None
    assert verdict.action.value == "accept"
    assert spf_of(verdict)[0] == "fail" and dmarc_of(verdict) == ("pass", BANK)
    assert "SPF reject dropped: DMARC passed through aligned DKIM" in verdict.log


def test_spf_reject_after_dmarc_still_rejects_a_spoof_with_the_spf_code(world: World) -> None:
    code, verdict = drive_to_end(world, REJECT_SPF + "SPFRejectAfterDMARC yes\n",
                                 compose(f"ceo@{BANK}"), mail_from=f"ceo@{BANK}")  # fmt: skip
    assert code is None and verdict is not None
    assert verdict.action.value == "reject" and verdict.reply is not None
    # policyd-spf's reply (RFC 7372), not DMARC's 5.7.1: the code the spoof got at RCPT before.
    assert (verdict.reply.code, verdict.reply.xcode) == ("550", "5.7.23")
    assert BANK in verdict.reply.text


def test_spf_reject_after_dmarc_keeps_a_dmarc_pass_through_spf_only_as_no_rescue(
        world: World, keys: Keys) -> None:  # fmt: skip
    """An aligned DKIM signature from another domain does not rescue: d= must align."""
    raw = compose(f"ceo@{BANK}")
    signed = dkim_sign(raw, keys.evil, "evil.example") + raw
    code, verdict = drive_to_end(world, "Mail_From_reject Fail\nSPFRejectAfterDMARC yes\n",
                                 signed, mail_from=f"ceo@{BANK}")  # fmt: skip
    assert code is None and verdict is not None and verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.xcode) == ("550", "5.7.23")


# -- 2. A From without a domain -------------------------------------------------------------------


@pytest.mark.parametrize("from_", ["undisclosed-recipients:;", "<>", ""],
                         ids=["empty-group", "null-address", "empty"])  # fmt: skip
def test_required_headers_rejects_a_from_without_a_domain(world: World, from_: str) -> None:
    verdict = run(world.ctx("RequiredHeaders yes\n"), compose(from_))
    assert verdict.action.value == "reject" and verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.xcode) == ("550", "5.6.0")
    assert "names no author domain" in verdict.reply.text


@pytest.mark.parametrize("from_", ["undisclosed-recipients:;", "<>", ""],
                         ids=["empty-group", "null-address", "empty"])  # fmt: skip
def test_a_from_without_a_domain_never_passes_dmarc(world: World, from_: str) -> None:
    verdict = run(world.ctx(), compose(from_))
    assert verdict.action.value == "accept"
    assert dmarc_of(verdict)[0] in ("permerror", "none")


# -- 3. dis= is the disposition applied -----------------------------------------------------------


def test_dis_is_none_when_the_policy_is_not_enforced(world: World) -> None:
    verdict = run(world.ctx(), compose(f"ceo@{BANK}"))
    (clause,) = [r for r in our_ar(verdict).results if r.method == "dmarc"]
    assert str(clause.result) == "fail"
    (value,) = added(verdict, "Authentication-Results")  # authres drops the comment
    assert f"dmarc=fail (p=reject dis=none) header.from={BANK}" in " ".join(value.split())


# -- 4. Directives the code always honours one way -----------------------------------------------


@pytest.mark.parametrize(("line", "warned"), [
    ("QueryCache yes", False), ("QueryCache no", True),
    ("RemoveARAll true", False), ("RemoveARAll false", True),
    ("SPFSelfValidate true", False), ("SPFSelfValidate false", True),
    ("IgnoreAuthenticatedClients true", False), ("IgnoreAuthenticatedClients false", True),
])  # fmt: skip
def test_fixed_directives_warn_only_when_set_to_what_is_not_done(line: str, warned: bool) -> None:
    loaded = build_config(read_settings_text(f"{line}\n", "a.conf"))
    messages = [str(w) for w in loaded.warnings]
    name = line.split()[0]
    assert any(m.startswith(f"a.conf:1: {name} ") and "not honoured" in m
               for m in messages) is warned  # fmt: skip


def test_effective_lines_show_what_fixed_directives_always_do() -> None:
    lines = effective_lines(Config.from_text("RemoveARAll no\n"))
    assert any(re.match(r"RemoveARAll\s+true\s+# always: ", line) for line in lines)
    assert not any(re.match(r"RemoveARAll\s+false", line) for line in lines)


def test_every_supported_directive_is_consumed_outside_config() -> None:
    """A directive the table calls supported must be read by the code that acts on it."""
    code = "\n".join(p.read_text() for p in SRC.rglob("*.py") if p.name != "config.py")
    # Consumed through what config derives from them: Mode → Config.signing / .verifying;
    # On-Default fills every On-* directive not set (test_config covers that).
    derived = {"mode": ("signing", "verifying"), "on_default": ("on_bad_signature",)}
    for d in DIRECTIVES:
        if d.support is not Support.SUPPORTED or d.name == "Include":
            continue
        names = derived.get(d.field_name, (d.field_name,))
        assert any(re.search(rf"\b(cfg|config)\.{n}\b", code) for n in names), d.name


def test_fixed_directives_have_no_config_attribute_to_read() -> None:
    fields = set(Config.__dataclass_fields__)
    for d in DIRECTIVES:
        if d.support is Support.FIXED:
            assert d.field_name not in fields, d.name


# -- set twice: values compared by meaning ---------------------------------------------------------


def test_set_twice_with_the_same_meaning_is_no_conflict(tmp_path: Path) -> None:
    dkim = write(tmp_path, "opendkim.conf", "Syslog yes\nUMask 007\n")
    dmarc = write(tmp_path, "opendmarc.conf", "Syslog true\nUMask 0007\n")
    assert load_split(dkim, dmarc).warnings == ()
    merged = write(tmp_path, "merged.conf", "Syslog yes\nSyslog True\nMode vs\nMode sv\n")
    assert load_config(merged).warnings == ()


def test_set_twice_with_another_meaning_is_still_named(tmp_path: Path) -> None:
    dkim = write(tmp_path, "opendkim.conf", "Syslog yes\n")
    dmarc = write(tmp_path, "opendmarc.conf", "Syslog no\n")
    (warning,) = load_split(dkim, dmarc).warnings
    assert str(warning).startswith(f"{dmarc}:1: Syslog is 'yes' in {dkim}:1 and 'no' here")


# -- TrustedAuthservIDs: never for mail straight from the internet ---------------------------------


def test_trusted_upstream_results_are_ignored_from_a_client_we_check(world: World) -> None:
    upstream = f"border.example.net; dkim=pass header.d={BANK}; spf=pass smtp.mailfrom=c@{BANK}"
    raw = compose(f"ceo@{BANK}", top=[("Authentication-Results", upstream)])
    direct = run(world.ctx("TrustedAuthservIDs border.example.net\n"), raw,
                 mail_from=f"ceo@{BANK}")  # fmt: skip
    assert dmarc_of(direct) == ("fail", BANK)
    relayed = run(world.ctx(f"TrustedAuthservIDs border.example.net\nWhitelist {ATTACKER_IP}\n"),
                  raw, mail_from=f"ceo@{BANK}")  # fmt: skip
    assert dmarc_of(relayed) == ("pass", BANK)


def test_trusted_authserv_ids_default_is_none() -> None:
    assert Config.from_text("").trusted_authserv_ids is None
    assert AID  # our own id is never trusted: see test_pipeline_spf_dmarc


def test_temperror_defer_without_an_enforcing_spf_option_is_warned() -> None:
    loaded = build_config(read_settings_text("TempError_Defer yes\n", "a.conf"))
    assert any(str(w).startswith("a.conf:1: TempError_Defer has no effect") for w in
               loaded.warnings)  # fmt: skip
    loaded = build_config(read_settings_text("TempError_Defer yes\nMail_From_reject Fail\n",
                                             "a.conf"))  # fmt: skip
    assert not any("has no effect" in str(w) for w in loaded.warnings)


def test_every_directive_has_its_own_attribute_name() -> None:
    """OpenDMARC's DomainWhitelist and policyd-spf's Domain_Whitelist must not share one."""
    names = [d.field_name for d in DIRECTIVES]
    assert len(names) == len(set(names))


# -- 3. Tutorial host lists: refile: TrustedHosts, wildcards in a file: list ---------------------


TRUSTED_HOSTS = "127.0.0.1\nlocalhost\n192.168.0.0/16\n*.example.com\n"


def test_tutorial_refile_trusted_hosts_is_read_with_a_warning_for_the_star_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    trusted = write(tmp_path, "TrustedHosts", TRUSTED_HOSTS)
    dkim = write(tmp_path, "opendkim.conf", "Mode v\nAuthservID mx.example\n"
                                            f"InternalHosts refile:{trusted}\n"
                                            f"ExternalIgnoreList refile:{trusted}\n")  # fmt: skip
    assert cli.main(["config-test", "--opendkim-conf", dkim]) == 0
    err = capsys.readouterr().err
    for name in ("InternalHosts", "ExternalIgnoreList"):
        # OpenDKIM probes "!host" first, and a leading "*" matches the "!" too: it excludes.
        assert (f"authmilter: warning: {trusted}:4: {name}: refile pattern '*.example.com' "
                "starts with '*'") in err
        assert "write '.example.com'" in err
    assert err.count("warning") == 2  # nothing else is wrong with the tutorial file
    ctx = cli.build_context(cli.resolve_authserv_id(load_split(dkim, None).config), sys.stderr)
    assert Connection(ctx, hostname=None, ip="192.168.7.7").internal
    assert Connection(ctx, hostname="localhost", ip="203.0.113.7").internal
    assert not Connection(ctx, hostname="mail.example.com", ip="203.0.113.7").internal


def test_wildcard_in_a_file_host_list_is_kept_and_warned_with_what_to_write(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    hosts = write(tmp_path, "trusted.hosts", TRUSTED_HOSTS)
    conf = write(tmp_path, "authmilter.conf", f"Mode v\nAuthservID mx.example\n"
                                              f"InternalHosts {hosts}\n")  # fmt: skip
    assert cli.main(["config-test", "-c", conf]) == 0
    err = capsys.readouterr().err
    assert f"authmilter: warning: {hosts}:4: InternalHosts: '*.example.com' is not a wildcard" \
        in err
    assert "write '.example.com' (every name below example.com)" in err
    fixed = write(tmp_path, "fixed.hosts", TRUSTED_HOSTS.replace("*.example.com", ".example.com"))
    conf = write(tmp_path, "fixed.conf", f"Mode v\nAuthservID mx.example\n"
                                         f"InternalHosts {fixed}\n")  # fmt: skip
    assert cli.main(["config-test", "-c", conf]) == 0
    assert "warning" not in capsys.readouterr().err
    ctx = cli.build_context(load_config(conf).config, sys.stderr)
    assert Connection(ctx, hostname="mail.example.com", ip="203.0.113.7").internal


def test_signature_without_bh_is_permerror_naming_domain_and_selector(world: World,
                                                                      keys: Keys) -> None:
    raw = compose(f"ceo@{BANK}")
    signature = re.sub(rb"\bbh=[^;]*;\s*", b"", dkim_sign(raw, keys.bank, BANK))
    verdict = run(world.ctx(), signature + raw)
    (clause,) = [r for r in our_ar(verdict).results if r.method == "dkim"]
    assert str(clause.result) == "permerror"
    assert (clause.header_d, clause.header_s) == (BANK, "sel")


# -- the authserv-id defaults to the MTA's name, as OpenDKIM and OpenDMARC ------------------------


def _from_mta(world: World, conf: str, raw: bytes) -> Verdict:
    cfg = cli.resolve_authserv_id(Config.from_text(f"Mode v\n{conf}"))
    ctx = Context.build(cfg, resolver=world.resolver, rand=lambda: 0.0)
    conn = Connection(ctx, hostname=None, ip=ATTACKER_IP, macros={"j": "mx.mta.example"})
    conn.set_helo(HELO)
    txn = conn.transaction()
    txn.envfrom(f"<ceo@{BANK}>")
    assert txn.rcpt("<user@ours.test>").reply is None
    fields, body = milter_view(raw)
    for name, value in fields:
        txn.header(name, value)
    txn.body(body)
    return txn.eom()


def test_authserv_id_unset_is_the_mta_name_and_forgeries_of_it_are_removed(world: World) -> None:
    forged = "mx.mta.example; dkim=pass header.d=bank.example"
    verdict = _from_mta(world, "", compose(f"ceo@{BANK}", top=[("Authentication-Results", forged)]))
    (value,) = added(verdict, "Authentication-Results")
    assert value.startswith("mx.mta.example; ")
    assert [(e.name, e.occurrence) for e in verdict.edits if isinstance(e, DeleteHeader)] == [
        ("Authentication-Results", 1)]  # fmt: skip
    received = [e.value for e in verdict.edits
                if isinstance(e, AddHeader) and e.name == "Received-SPF"]  # fmt: skip
    assert received and received[0].endswith("receiver=mx.mta.example")


@pytest.mark.parametrize("conf", ["AuthservID mx.conf.example\n", "Authserv_Id mx.conf.example\n"])
def test_a_configured_authserv_id_wins_over_the_mta_name(world: World, conf: str) -> None:
    verdict = _from_mta(world, conf, compose(f"ceo@{BANK}"))
    (value,) = added(verdict, "Authentication-Results")
    assert value.startswith("mx.conf.example; ")
