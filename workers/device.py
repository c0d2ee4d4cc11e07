"""A GPU that stopped working for this process: give its jobs back and exit.

A CUDA error (an illegal address, a device-side assert, a launch failure, an ECC error...)
is sticky: every later call of the process on that GPU fails too. A worker that went on
would fail every job it took, fast, taking them from healthy workers. So on such an error
the worker gives the leases of its running jobs back (the sweeper hands them out again at
its next round, each attempt counted, so a job that breaks every GPU it meets ends
`worker_lost` after its attempts) and exits with EXIT_DEVICE_LOST, to be started again on
a fresh CUDA context: by `spool worker`'s supervisor on a multi-GPU host, else by the
container's or the service's restart policy.

Torch-free on import: a housekeeping worker never loads torch, and an error can only come
from torch if torch is loaded.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import NoReturn

log = logging.getLogger("spool.worker")

EXIT_DEVICE_LOST = 75  # EX_TEMPFAIL: start me again
_exiting = threading.Lock()


def lost(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) is a device error that leaves the process's CUDA
    context unusable. Out of memory is not one, even as a CUDA error (a library's own
    allocation failing): the backends recover from it."""
    torch = sys.modules.get("torch")
    accelerator = getattr(torch, "AcceleratorError", None) if torch is not None else None
    out_of_memory = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if out_of_memory is not None and isinstance(exc, out_of_memory):
            return False
        if "out of memory" in str(exc):  # cudaErrorMemoryAllocation: not sticky
            return False
        if accelerator is not None and isinstance(exc, accelerator):
            return True
        # torch before AcceleratorError (2.8) raised them as plain RuntimeErrors.
        if isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def exit_if_lost(exc: BaseException, worker: str) -> None:
    """`exit_for` when `exc` says the GPU is lost; else return, for the caller to handle it."""
    if lost(exc):
        exit_for(exc, worker)


def exit_for(exc: BaseException, worker: str) -> NoReturn:
    """Give back this worker's running jobs and end the process now (no warm shutdown:
    its jobs cannot finish on this GPU). Called from any thread; the first one exits."""
    if not _exiting.acquire(blocking=False):
        while True:  # another thread is giving the jobs back and exiting
            time.sleep(1)
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    log.critical("the GPU failed for this process (%s): giving its jobs back and exiting", reason)
    try:
        from workers import lease

        given = lease.give_back(worker)
        log.critical("gave back %d running job(s); exiting with %d", given, EXIT_DEVICE_LOST)
    except Exception as err:  # their leases run out instead
        log.critical("could not give the jobs back (%s); exiting with %d", err, EXIT_DEVICE_LOST)
    logging.shutdown()
    os._exit(EXIT_DEVICE_LOST)
