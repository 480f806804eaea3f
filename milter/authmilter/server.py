"""The pymilter adapter: the socket and the libmilter callbacks.

Foundation stage: the process validates its configuration, loads its keys, listens on the
configured socket and answers the milter protocol, accepting every message unchanged. The
per-message pipeline (signing, verifying, Authentication-Results) plugs in here next.
"""

from __future__ import annotations

import logging
import os
from functools import partial

import Milter

from authmilter.config import Config

log = logging.getLogger("authmilter")


class PassThroughMilter(Milter.Base):  # type: ignore[misc]
    """Answers every connection and accepts every message untouched."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        """Note the client; nothing to decide yet."""
        return int(Milter.CONTINUE)

    def eom(self) -> int:
        """Accept the message as it is."""
        log.info("%s: accepted unchanged", self.getsymval("i") or "NOQUEUE")
        return int(Milter.ACCEPT)


def serve(cfg: Config) -> int:
    """Listen on ``cfg.socket`` until stopped; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="authmilter[%(process)d]: %(message)s")
    if cfg.umask is not None:
        os.umask(cfg.umask)
    Milter.factory = partial(PassThroughMilter, cfg)
    Milter.set_flags(0)
    log.info("listening on %s", cfg.socket)
    Milter.runmilter("authmilter", cfg.socket, timeout=600)
    return 0
