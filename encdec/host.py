"""Process-level settings for CPU training: how the C allocator hands memory back.

A training step frees and re-allocates the same activation and gradient buffers every step.
glibc's malloc serves blocks above its mmap threshold (dynamic, 128 KiB to 32 MiB) with fresh
``mmap`` calls and returns them with ``munmap`` on free, so each step touches tens of thousands
of new pages (measured: 30-47k minor page faults and ~0.2 s of kernel time per g2p-small step on
a 2-core CPU, about 7 % of the step). Raising the mmap threshold and the trim threshold keeps freed
blocks in the heap for the next step: the faults drop to under a hundred per step and the peak
RSS does not grow, since the same sizes recur (``benchmarks/train_speed.py`` measures the gain).

That holds for token batches. Speech and TTS batches of 10 ms frames take many more shapes, the
retained heap fragments: an hour of asr-small peaked at 6.2 GB RSS with the setting (4.0 GB by
update 200, against 1.8 GB without it in a rerun of the same preset; the November hour without
it peaked at 2.5 GB), so the trainer applies it to text data only.

Even with glibc's defaults those batches leave free blocks scattered through the heap (the
dynamic mmap threshold rises to 32 MiB after the first large free, so most activations come
from the heap): the December asr-small hour peaked at 3.6 GB. For audio data the trainer calls
``trim_heap`` every ``train.trim_every`` steps and after each validation, which hands those
pages back (README "Speech recognition" measures it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap and are reused
_TRIM_THRESHOLD = (1 << 31) - 1  # never hand the heap's free top back between steps
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_done: bool | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version  # absent on musl and other C libraries
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc


def allocator_environment() -> dict[str, str]:
    """The same setting as environment variables, for a process encdec does not start itself."""
    return {_ENV[0]: str(_MMAP_THRESHOLD), _ENV[1]: str(_TRIM_THRESHOLD)}


def retain_freed_memory() -> bool:
    """Keep freed blocks in glibc's heap for reuse; True when the setting is in force.

    Does nothing (False) off Linux/glibc, and leaves the allocator alone (False) when the
    user set MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ in the environment. Idempotent.
    """
    global _done
    if _done is not None:
        return _done
    libc = _glibc()
    if libc is None or any(name in os.environ for name in _ENV):
        _done = False
        return _done
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    _done = ok
    return _done


_libc = None


def trim_heap() -> bool:
    """Hand the free pages of glibc's heaps back to the system (``malloc_trim(0)``): the pages
    of every free block, not only the heap's top, in every arena. True when it ran.

    For audio batches on the CPU: the trainer calls it between steps (``train.trim_every``), so
    that the free blocks the varying shapes leave behind stop counting as resident memory; the
    pages are faulted in again when a block is reused. Does nothing (False) off Linux/glibc.
    """
    global _libc
    if _libc is None:
        _libc = _glibc() or False
        if _libc:
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True


def resident_mb() -> float | None:
    """This process's resident memory now, in MiB (``/proc/self/statm``); None where the file
    does not exist. Beside the peak (``ru_maxrss``), it tells memory that is still held from a
    high-water mark that was reached once."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
