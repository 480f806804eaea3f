#!/usr/bin/env python3
"""ARC in the benchmark: the chains its ARC scenarios carry, and what sealing costs in process.

``bench/run.py`` uses this module twice:

- **Chains.** :func:`seal_hops` seals a DKIM-signed message once per :class:`Hop`, as that
  many forwarders in a row would: each adds a ``Received`` field, judges the chain it got with
  :func:`authmilter.arc_verify.verify_chain` and seals on top with
  :func:`authmilter.arc_sign.seal` (RSA-2048). The chain is verified after every hop, so a
  scenario never measures mail whose chain does not pass. The hops' keys are published in the
  benchmark's zone (:func:`hop_records`), the way its DKIM keys are.
- **What sealing costs.** :func:`measure` is a micro-benchmark of the pure functions, no
  milter, no Postfix, no network: ``seal`` at instance 1 (mail without ARC, what ``ARCSign
  inbound`` adds to most mail), at instance 2 and at instance 4 (the ARC-Seal then covers 1 or
  3 older sets); ``verify_chain`` of 1 and of 3 sets; and one RSA-2048 signature, for scale (a
  seal makes two). Each case runs ``rounds`` × ``calls`` times; the figure is the CPU time of
  the calling thread (``time.thread_time``) per call, so nothing else on the machine is
  counted. ``seal`` gets the raw body, so it hashes the body each call (relaxed, SHA-256), as
  the milter hashes every message it seals. DNS answers come from the zone text in memory,
  through a cache (the milter's resolver caches keys for their TTL).

Run alone (no root, no daemons, nothing on the network) it prints the micro-benchmark table::

    .venv/bin/python bench/arc_seal.py                       # 200 calls × 5 rounds a case
    .venv/bin/python bench/arc_seal.py --calls 20 --rounds 1 # a quick look
"""

from __future__ import annotations

import argparse
import email.utils
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from authmilter.arc_sign import seal
from authmilter.arc_verify import ArcOutcome, verify_chain
from authmilter.dkim_verify import TxtLookup
from authmilter.keys import PrivateKey, generate_private_key, key_record_text

HOP_SELECTOR = "arc"
#: At most this many seconds of measuring per case, whatever ``calls`` × ``rounds`` says.
CASE_BUDGET_S = 30.0


class ArcBenchError(RuntimeError):
    """A chain did not come out as it must; the benchmark stops."""


@dataclass(frozen=True, slots=True)
class Hop:
    """A forwarder that seals: its ``d=``, ``s=`` and RSA key."""

    domain: str
    selector: str
    key: PrivateKey

    @property
    def authserv_id(self) -> str:
        return f"mx.{self.domain}"

    def sealer(self) -> tuple[str, str, PrivateKey]:
        return (self.domain, self.selector, self.key)


def make_hops(count: int, parent: str) -> list[Hop]:
    """``count`` forwarders ``hop1.<parent>`` …, each with its own RSA-2048 key."""
    return [Hop(f"hop{i}.{parent}", HOP_SELECTOR, generate_private_key("rsa", 2048))
            for i in range(1, count + 1)]  # fmt: skip


def hop_records(hops: Sequence[Hop], parent: str) -> dict[str, str]:
    """The hops' key records: owner relative to ``parent`` → TXT text."""
    return {f"{h.selector}._domainkey.{h.domain.removesuffix('.' + parent)}": key_record_text(h.key)
            for h in hops}  # fmt: skip


class CachedTxt:
    """A :class:`TxtLookup` that asks ``lookup`` once per name (answers only; errors are
    not kept). The milter's resolver keeps keys for their TTL, which outlasts any run here."""

    def __init__(self, lookup: TxtLookup) -> None:
        self.lookup = lookup
        self.answers: dict[str, list[bytes]] = {}

    def txt(self, name: str) -> list[bytes]:
        key = name.rstrip(".").lower()
        if key not in self.answers:
            self.answers[key] = self.lookup.txt(name)
        return self.answers[key]


def split(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Header fields (name, value as on the wire) top first, and the body."""
    headers, body = dkim.rfc822_parse(message)
    return [(bytes(name), bytes(value)) for name, value in headers], bytes(body)


def prepend(fields: Sequence[tuple[str, str]], message: bytes) -> bytes:
    return b"".join(f"{name}: {value}\r\n".encode() for name, value in fields) + message


def seal_hops(message: bytes, hops: Sequence[Hop], lookup: TxtLookup, *, ar_value: str,
              now: float) -> bytes:  # fmt: skip
    """``message`` after passing through ``hops`` in order, each adding ``Received`` and an
    ARC Set whose AAR is ``ar_value`` plus ``arc=`` the chain it found.

    :raises ArcBenchError: a hop found the chain other than ``none`` (first hop) or ``pass``
        with one instance per earlier hop, or the final chain does not pass.
    """
    date = email.utils.formatdate(now, localtime=False)
    previous = "the sender"
    for i, hop in enumerate(hops, 1):
        message = (f"Received: from {previous} by {hop.authserv_id} with ESMTPS id hop{i};\r\n"
                   f"\t{date}\r\n").encode() + message  # fmt: skip
        headers, body = split(message)
        chain = verify_chain(headers, body, lookup, now=now)
        want = ("none", 0) if i == 1 else ("pass", i - 1)
        if (chain.result, chain.instances) != want:
            raise ArcBenchError(f"hop {i} ({hop.domain}) found the chain {chain.result} with "
                                f"{chain.instances} set(s), expected {want}: {chain.reason}")
        fields = seal(headers, body, hop.sealer(), authserv_id=hop.authserv_id,
                      ar_value=f"{ar_value}; arc={chain.result}", chain=chain, now=now)
        message = prepend(fields, message)
        previous = hop.authserv_id
    check_chain(message, lookup, len(hops), now=now)
    return message


def check_chain(message: bytes, lookup: TxtLookup, instances: int, *,
                now: float | None = None) -> ArcOutcome:  # fmt: skip
    """The chain of ``message``, which must pass with ``instances`` sets."""
    headers, body = split(message)
    chain = verify_chain(headers, body, lookup, now=now)
    if (chain.result, chain.instances) != ("pass", instances):
        raise ArcBenchError(f"chain {chain.result} with {chain.instances} set(s), expected "
                            f"pass with {instances}: {chain.reason}")  # fmt: skip
    return chain


# --------------------------------------------------------------------------------------------
# The micro-benchmark
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MicroResult:
    case: str
    input_bytes: int
    calls: int
    cpu_ms: tuple[float, ...]  # per call, one value per round

    def summary(self) -> str:
        med = statistics.median(self.cpu_ms)
        if len(self.cpu_ms) == 1:
            return f"{med:.3f}"
        return f"{med:.3f} ({min(self.cpu_ms):.3f}–{max(self.cpu_ms):.3f})"


def _time_case(fn: Callable[[], object], calls: int, rounds: int) -> tuple[float, ...]:
    """CPU ms of this thread per call, one figure per round (stops early past the budget)."""
    per_call: list[float] = []
    started = time.monotonic()
    for _ in range(rounds):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        per_call.append((time.thread_time() - t0) * 1000 / calls)
        if time.monotonic() - started > CASE_BUDGET_S:
            break
    return tuple(per_call)


def measure(message: bytes, sealer: tuple[str, str, PrivateKey], hops: Sequence[Hop],
            lookup: TxtLookup, *, ar_value: str, calls: int = 200,
            rounds: int = 5) -> list[MicroResult]:  # fmt: skip
    """The micro-benchmark on ``message`` (DKIM-signed, no ARC yet); ``sealer`` is our key
    (RSA), ``hops`` at least three forwarders whose keys ``lookup`` knows.

    Every case runs once unmeasured first, and its result is checked: what ``seal`` makes
    passes ``verify_chain`` with one more set, ``verify_chain`` says pass.
    """
    if len(hops) < 3:
        raise ValueError("the micro-benchmark needs three hops")
    if calls < 1 or rounds < 1:
        raise ValueError("calls and rounds must be at least 1")
    now = time.time()
    chains = {n: seal_hops(message, hops[:n], lookup, ar_value=ar_value, now=now) if n else message
              for n in (0, 1, 3)}  # fmt: skip
    results: list[MicroResult] = []

    def add(case: str, data: bytes, fn: Callable[[], object]) -> None:
        results.append(MicroResult(case, len(data), calls, _time_case(fn, calls, rounds)))

    for n in (0, 1, 3):
        data = chains[n]
        headers, body = split(data)
        chain = verify_chain(headers, body, lookup, now=now)
        sealed = prepend(seal(headers, body, sealer, authserv_id="mx.bench", ar_value=ar_value,
                              chain=chain, now=now), data)  # fmt: skip
        check_chain(sealed, lookup, n + 1, now=now)

        def seal_call(headers: list[tuple[bytes, bytes]] = headers, body: bytes = body,
                      chain: ArcOutcome = chain) -> object:  # fmt: skip
            return seal(headers, body, sealer, authserv_id="mx.bench", ar_value=ar_value,
                        chain=chain, now=now)

        add(f"arc_sign.seal, instance {n + 1} ({f'on a chain of {n}' if n else 'no chain yet'})",
            data, seal_call)
    for n in (1, 3):
        data = chains[n]
        headers, body = split(data)
        check_chain(data, lookup, n, now=now)

        def verify_call(headers: list[tuple[bytes, bytes]] = headers,
                        body: bytes = body) -> object:  # fmt: skip
            return verify_chain(headers, body, lookup, now=now)

        add(f"arc_verify.verify_chain, chain of {n}", data, verify_call)
    private = sealer[2].key
    if not isinstance(private, rsa.RSAPrivateKey):
        raise ValueError("the sealing key must be RSA")
    digest_input = b"x" * 512

    def rsa_call() -> object:
        return private.sign(digest_input, padding.PKCS1v15(), hashes.SHA256())

    add(f"one RSA-{private.key_size} signature, for scale (a seal makes two)", digest_input,
        rsa_call)
    return results


def micro_table(results: Sequence[MicroResult]) -> str:
    lines = ["| case | input bytes | calls × rounds | CPU ms/call |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.case} | {r.input_bytes} | {r.calls} × {len(r.cpu_ms)} | {r.summary()} |"
              for r in results]  # fmt: skip
    return "\n".join(lines)


def micro_report(results: Sequence[MicroResult], rounds: int) -> str:
    """The table with the sentence that says what it is (for bench/run.py's report)."""
    return (
        "ARC sealing and verifying in process (`bench/arc_seal.py`): CPU time of the calling "
        f"thread per call, median (min–max) over {rounds} round(s); `seal` hashes the body "
        "each call; key records from memory, cached as the milter's resolver caches them.\n\n"
        + micro_table(results)
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Micro-benchmark of ARC sealing (arc_sign.seal) "
                                "and verifying, in process (see the module docstring).")
    p.add_argument("--calls", type=int, default=200, help="calls per round (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per case (default 5)")
    args = p.parse_args(argv)
    if not 1 <= args.calls <= 10_000 or not 1 <= args.rounds <= 20:
        p.error("--calls must be 1..10000 and --rounds 1..20")
    import run  # bench/run.py: the benchmark's own messages and zone (and tests/ on sys.path)

    from dnsserver import make_zone, txt_rdata
    from fakedns import ZoneResolver

    keys = generate_private_key("rsa", 2048)
    hops = make_hops(3, run.DOMAIN)
    records = {f"{run.RSA_SELECTOR}._domainkey": key_record_text(keys),
               **hop_records(hops, run.DOMAIN)}  # fmt: skip
    zone = make_zone(run.DOMAIN, [(o, "TXT", txt_rdata(t)) for o, t in records.items()])
    lookup = CachedTxt(ZoneResolver(zone, run.DOMAIN))
    message = run.presigned(0, 4096, keys.pem())  # the first 4 KiB message of its verify runs
    sealer = (run.DOMAIN, run.RSA_SELECTOR, keys)
    results = measure(message, sealer, hops, lookup, ar_value=run.ARC_AR_VALUE,
                      calls=args.calls, rounds=args.rounds)  # fmt: skip
    print(micro_report(results, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
