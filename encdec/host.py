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

Trimming caps what the free blocks hold, not what the heap grows to between two trims: the
asr-small peak still reached 2.8 GB in an hour. tcmalloc (gperftools, Debian
``libtcmalloc-minimal4``) keeps per-size free lists that varying shapes reuse: on the same 120
asr-small updates it peaked at 0.95 GB against 1.85 GB, with 0.78x the time per update and 250
page faults per update against 12,400 (``benchmarks/allocator_memory.py``); the hour peaked at
1.05 GB against 2.80 GB. For text data glibc with ``retain_freed_memory`` stays (g2p-small:
within noise of tcmalloc). A C allocator is chosen when a process starts, so ``encdec train`` on
audio data on the CPU re-executes itself with tcmalloc preloaded (``train.allocator``,
``reexec_with_tcmalloc``), as PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu``) does
by default. What serves a process is ``allocator()``.
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

# Loader names of tcmalloc, most specific first: the minimal build has no heap profiler
TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")
# Set in the environment of the re-executed process, so that it never re-executes again
REEXEC_MARK = "ENCDEC_ALLOCATOR_REEXEC"


def allocator() -> str:
    """The C allocator serving this process: "tcmalloc", "jemalloc" or "system" (the C
    library's own; on Linux, whichever shared library is mapped into the process)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"/lib{name}" in maps:
            return name
    return "system"


def find_tcmalloc() -> str | None:
    """The path of an installed tcmalloc (Debian ``libtcmalloc-minimal4``), or None."""
    if not sys.platform.startswith("linux"):
        return None
    for name in TCMALLOC:
        for folder in _LIB_DIRS:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                return path
    for name in ("tcmalloc_minimal", "tcmalloc"):  # elsewhere on the loader's path
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def reexec_with_tcmalloc(argv: list[str] | None = None) -> str | None:
    """Replace this process with the same command run with tcmalloc preloaded (``LD_PRELOAD``;
    the same process id, arguments and environment otherwise). Returns, without doing
    anything, a sentence saying why not: tcmalloc (or jemalloc) already serves the process, it
    was re-executed once already, or no tcmalloc is installed. ``argv`` defaults to the
    interpreter's own command line (``sys.orig_argv``)."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    current = allocator()
    if current != "system":
        return f"{current} already serves this process"
    if os.environ.get(REEXEC_MARK):
        return "re-executed once already and tcmalloc did not load"
    lib = find_tcmalloc()
    if lib is None:
        return "no tcmalloc installed (Debian: libtcmalloc-minimal4)"
    argv = list(sys.orig_argv if argv is None else argv)
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env[REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
    return None  # not reached


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
