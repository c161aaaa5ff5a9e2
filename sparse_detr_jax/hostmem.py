"""Host memory: keep what the process frees for its next use instead of handing it back to the kernel.

glibc's malloc serves every block above its mmap threshold (32 MB at most) with a fresh mmap and unmaps it on free,
and trims the heap's free top back to the kernel. XLA:CPU allocates each execution's buffers afresh, so every
train step or forward faults its working set back in, page by page, zero-filled by the kernel: on the 2-core CPU
machine the rho 0 train step at 384x512 batch 2 took 900k minor page faults and 5 s of system time of its 8-10 s,
5.8 s without them, at the same peak resident memory (PyTorch's CPU allocator gains the same way: a torchvision
ResNet-50 forward + backward at that size 1.75 -> 1.25 s). This module has no dependencies, so that
benchmarks/official_side.py runs the official side with the same setting.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def jax_may_use_an_accelerator() -> bool:
  """Whether JAX would look beyond the CPU, without starting it: a PJRT plugin (the `jax_plugins` namespace or entry
  points: CUDA, ROCm) or libtpu is installed and JAX_PLATFORMS does not pin the CPU."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and set(platforms.lower().split(",")) <= {"cpu"}:
    return False
  if importlib.util.find_spec("libtpu") or importlib.metadata.entry_points(group="jax_plugins"):
    return True
  namespace = importlib.util.find_spec("jax_plugins")
  return bool(namespace and any(pkgutil.iter_modules(namespace.submodule_search_locations)))


def retain_freed_memory() -> bool:
  """Serve every block from one heap (no mmap, one arena) and never trim it: freed memory stays with the process for
  reuse, and its resident size stays at its peak. One arena because glibc gives each thread that allocates its own
  arena of 64 MB heaps and deletes a heap as soon as it is empty, so XLA's worker threads would still fault their
  blocks in afresh (the rho 0 forward at 800x1066 batch 4: 2.1M faults a forward with an arena per thread, none with
  one; 22.5 s by default, 18.9 s with arenas per thread, 17.0 s with one).

  For programs that run the same computation over and over (train.py, evaluate.py, the benchmarks); importing the
  library never calls it. The one arena slows XLA's compilation, whose threads then share one malloc lock (the demo's
  train step 27 -> 35 s; no mmap and no trimming alone: 27-28 s), so the test suite, mostly compilation, runs
  without it. Where JAX may run on a GPU or TPU it does nothing: device buffers are not malloc'd, only the
  compilation would get slower. It must run before JAX starts its CPU backend (set afterwards, XLA's worker threads
  keep arenas of their own: the rho 0 forward at 800x1066 batch 2 still took 0.9-1.0M faults a forward, against
  0-6k). Returns whether it took effect (False on an accelerator, and where the C library has no glibc mallopt:
  macOS, Windows).
  """
  if jax_may_use_an_accelerator():
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # M_TRIM_THRESHOLD is a size_t inside glibc: -1 is SIZE_MAX, a heap top never trimmed. Threads that have allocated
  # already keep their arenas; the ones XLA starts later share the main one.
  return all(mallopt(param, value) for param, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_ARENA_MAX, 1)))
