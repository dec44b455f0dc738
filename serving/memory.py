"""Memory a burst of large requests used goes back to the system.

glibc's allocator keeps what a process freed for its own later use, in one arena per
thread that allocated it: after eight 3.9 MB prompts were tokenized in the counting
threads, the gateway stayed 120 MB larger for good. Two settings bound that: arenas are
capped (``M_ARENA_MAX``), and a daemon thread asks glibc every ``interval_s`` to hand free
pages back (``malloc_trim``; a few milliseconds, outside the event loop, with the GIL
released by ctypes). On a libc without them (musl, macOS) both are skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger("weir.memory")
M_ARENA_MAX = -8  # mallopt's parameter number in glibc's malloc.h
ARENAS = 2
_started = False


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None
    return libc


def trim() -> bool:
    """Give free heap pages back to the system now; False where libc cannot."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def start_trimmer(interval_s: float) -> bool:
    """Cap glibc's arenas and trim every ``interval_s`` in a daemon thread (once per
    process; False where libc has no such calls)."""
    global _started
    libc = _libc()
    if libc is None or _started:
        return _started
    libc.mallopt(M_ARENA_MAX, ARENAS)
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            libc.malloc_trim(0)

    threading.Thread(target=run, name="weir-malloc-trim", daemon=True).start()
    _started = True
    log.debug("malloc arenas capped at %d, trimmed every %.0f s", ARENAS, interval_s)
    return True
