"""hostmem.retain_freed_memory: a freed block is reused without page faults, in the main thread and in a thread
started later (as XLA's workers are), where by default glibc unmaps it and the next one faults every page in again."""

import subprocess
import sys

import pytest

SIZE = 48 << 20  # fits one of glibc's 64 MB thread heaps

# In a fresh process (argv: default|retain, main|thread): malloc + touch + free a block, then malloc + touch another,
# in the main thread or in a new one; print the minor page faults of the second touch.
REFAULTS = f"""
import ctypes, resource, sys, threading
from sparse_detr_jax import hostmem
if sys.argv[1] == "retain" and not hostmem.retain_freed_memory():
  sys.exit(print("unavailable"))
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
def twice():
  first = libc.malloc({SIZE})
  ctypes.memset(first, 1, {SIZE})
  libc.free(first)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  second = libc.malloc({SIZE})
  ctypes.memset(second, 1, {SIZE})
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if sys.argv[2] == "main":
  twice()
else:
  t = threading.Thread(target=twice)
  t.start()
  t.join()
print(faults[0])
"""


def refaults(mode: str, where: str) -> int:
  out = subprocess.run([sys.executable, "-c", REFAULTS, mode, where], capture_output=True, text=True, check=True)
  if out.stdout.strip() == "unavailable":
    pytest.skip("no glibc mallopt in this C library")
  return int(out.stdout)


@pytest.mark.parametrize("where", ["main", "thread"])
def test_freed_memory_is_reused_without_page_faults(where):
  # In subprocesses only: the setting slows XLA's compilation, which is most of this suite's time.
  pages = SIZE // 4096
  retained = refaults("retain", where)
  assert refaults("default", where) > pages // 2  # glibc's default: unmapped on free, faulted in again
  assert retained < pages // 100
