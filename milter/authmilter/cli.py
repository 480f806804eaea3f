"""The ``authmilter`` command: ``run``, ``config-test``, ``genkey``, ``testkey``, ``check-dmarc``,
``rotate`` and ``reports``.

This is the only module that reads the environment (host name, argv, streams).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from authmilter import __version__
from authmilter.config import Config, Loaded, effective_lines, load_config, load_split
from authmilter.errors import AuthmilterError, ConfigError

if TYPE_CHECKING:
    from authmilter.pipeline import Context  # noqa: F401 - annotations only

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # sysexits.h EX_CONFIG, as the anchors use for configuration errors

DEFAULT_CONFIG = "/etc/authmilter/authmilter.conf"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from authmilter.dmarctools import add_check_dmarc_parser
    from authmilter.keytools import add_genkey_parser, add_testkey_parser
    from authmilter.reports.commands import add_reports_parser
    from authmilter.rotate import add_rotate_parser

    parser = argparse.ArgumentParser(
        prog="authmilter",
        description="DKIM signing and verification, SPF and DMARC in one milter.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"authmilter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run the milter in the foreground")
    _add_config_args(run)
    run.add_argument("-p", dest="socket", metavar="SOCKETSPEC",
                     help="listen here instead of the configured Socket (as opendkim -p)")
    run.set_defaults(func=cmd_run)

    test = sub.add_parser("config-test", help="check a configuration (like opendkim -n)")
    _add_config_args(test)
    test.add_argument("-v", "--verbose", action="store_true",
                      help="print the effective configuration")
    test.set_defaults(func=cmd_config_test)

    add_genkey_parser(sub)
    add_testkey_parser(sub, default_config=DEFAULT_CONFIG)
    add_check_dmarc_parser(sub, default_config=DEFAULT_CONFIG)
    add_rotate_parser(sub, default_config=DEFAULT_CONFIG)
    add_reports_parser(sub, _add_config_args)
    return parser


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE",
                   help=f"merged authmilter configuration (default {DEFAULT_CONFIG})")
    p.add_argument("--opendkim-conf", metavar="FILE",
                   help="read an existing opendkim.conf unchanged (instead of -c)")
    p.add_argument("--opendmarc-conf", metavar="FILE",
                   help="read an existing opendmarc.conf unchanged (instead of -c)")
    p.add_argument("--policyd-spf-conf", metavar="FILE",
                   help="read an existing policyd-spf.conf unchanged (instead of -c)")


def load_from_args(ns: argparse.Namespace, err: TextIO) -> Loaded:
    """Read the configuration the arguments name and print its warnings.

    :raises ConfigError: when it cannot be used.
    """
    overrides = {"Socket": ns.socket} if getattr(ns, "socket", None) else None
    if ns.opendkim_conf or ns.opendmarc_conf or ns.policyd_spf_conf:
        if ns.config:
            raise ConfigError("give either -c or --opendkim-conf/--opendmarc-conf/"
                              "--policyd-spf-conf, not both")  # fmt: skip
        loaded = load_split(ns.opendkim_conf, ns.opendmarc_conf, ns.policyd_spf_conf,
                            overrides=overrides)  # fmt: skip
    else:
        loaded = load_config(ns.config or DEFAULT_CONFIG, overrides=overrides)
    for w in loaded.warnings:
        print(f"authmilter: warning: {w}", file=err)
    return Loaded(resolve_authserv_id(loaded.config), loaded.warnings)


def read_default_config(path: str, err: TextIO, prefix: str, *, verbose: bool) -> Config | None:
    """The default configuration file of ``testkey`` and ``check-dmarc`` (given neither ``-c``
    nor ``--nameservers``), read as opendkim-testkey reads opendkim.conf without ``-x``.

    None when ``path`` does not exist: the tool uses /etc/resolv.conf as before. A file that
    exists but cannot be read is skipped with a warning (opendkim-testkey skips it silently).
    With ``verbose`` it says which: "using default configfile …", in opendkim-testkey's words.

    :raises ConfigError: naming file:line of the first problem in it.
    """
    if not os.path.exists(path):
        if verbose:
            print(f"{prefix}: no default configfile {path}; using /etc/resolv.conf", file=err)
        return None
    if not os.access(path, os.R_OK):
        print(f"{prefix}: warning: cannot read default configfile {path}; using "
              "/etc/resolv.conf (give -c or --nameservers)", file=err)  # fmt: skip
        return None
    if verbose:
        print(f"{prefix}: using default configfile {path}", file=err)
    return load_config(path).config


def resolve_authserv_id(cfg: Config) -> Config:
    """``AuthservID`` unset or ``HOSTNAME`` means policyd-spf's ``Authserv_Id`` if that is
    set, else this host's name (as OpenDKIM)."""
    if cfg.authserv_id is None or cfg.authserv_id == "HOSTNAME":
        spf_id = cfg.spf_authserv_id
        name = spf_id if spf_id and spf_id != "HOSTNAME" else socket.gethostname()
        return dataclasses.replace(cfg, authserv_id=name)
    return cfg


def build_context(cfg: Config, err: TextIO) -> Context:
    """Open every dataset, load every key and make the resolver the configuration names.

    :raises ConfigError: on the first one that cannot be used.
    """
    from authmilter.pipeline import Context
    from authmilter.resolver import config_resolver

    ctx = Context.build(cfg, resolver=config_resolver(cfg))
    for warning in ctx.dataset_warnings():
        print(f"authmilter: warning: {warning}", file=err)
    for name, where in ctx.keys.dangling_names():
        print(f"authmilter: warning: {where}: SigningTable names key '{name}', "
              "which is not in the KeyTable", file=err)  # fmt: skip
    if cfg.signing and not ctx.keys.can_sign:
        print("authmilter: warning: Mode includes signing but no key is configured "
              "(KeyTable+SigningTable or Domain+KeyFile+Selector)", file=err)  # fmt: skip
    return ctx


def cmd_config_test(ns: argparse.Namespace) -> int:
    """``authmilter config-test``: exit 0 only when the configuration is usable."""
    from authmilter.server import check_pid_folder, check_socket_folder, privileges

    loaded = load_from_args(ns, sys.stderr)
    # The keys are judged as at start: readable by this user (root, for a service), owned
    # by root, this user or the UserID user.
    build_context(loaded.config, sys.stderr)
    privileges(loaded.config)
    check_socket_folder(loaded.config)
    note = check_pid_folder(loaded.config)
    if note:
        print(f"authmilter: note: {note}", file=sys.stderr)
    if ns.verbose:
        for line in effective_lines(loaded.config):
            print(line)
    print(f"configuration OK ({', '.join(loaded.config.sources) or 'defaults'})", file=sys.stderr)
    return EXIT_OK


def cmd_run(ns: argparse.Namespace) -> int:
    """``authmilter run``: check the configuration, then serve milter connections."""
    from authmilter.server import serve

    loaded = load_from_args(ns, sys.stderr)
    ctx = build_context(loaded.config, sys.stderr)

    def reload() -> tuple[Config, Context]:
        # The same files, read again by the supervisor, with the rights it started with.
        again = load_from_args(ns, sys.stderr)
        return again.config, build_context(again.config, sys.stderr)

    return serve(loaded.config, ctx, reload)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        code: int = ns.func(ns)
    except ConfigError as e:
        print(f"authmilter: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except AuthmilterError as e:
        print(f"authmilter: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return code
