"""What a worker inherits from the supervisor at the fork."""

from __future__ import annotations

import gc
import os
from typing import Any

from authmilter.supervisor import Supervisor


def test_a_worker_starts_with_everything_the_supervisor_held_frozen() -> None:
    """The supervisor's objects are frozen before the fork (gc.freeze): the worker's cyclic
    collector never walks them, so their pages stay shared copy-on-write instead of being
    copied into every worker at its first full collection (`make bench` measures the PSS)."""
    held = [[n] for n in range(5000)]  # what the supervisor holds: configuration, keys …
    read_fd, write_fd = os.pipe()

    def work(_ctx: Any) -> None:
        os.write(write_fd, f"{gc.get_freeze_count()} {len(gc.get_objects(2))}".encode())

    supervisor = Supervisor(1, work, None)  # type: ignore[arg-type]
    try:
        supervisor._spawn()  # noqa: SLF001 - the fork itself is what is tested
        (pid,) = supervisor.workers
        frozen, old = map(int, os.read(read_fd, 100).split())
        _, status = os.waitpid(pid, 0)
    finally:
        gc.unfreeze()  # the test process goes on as it was
        os.close(read_fd)
        os.close(write_fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert frozen >= len(held)  # all of them, and the rest of what this process holds
    assert old < frozen // 10  # the oldest generation, which full collections walk, is ~empty
    assert held[-1] == [4999]
