"""hostmem.retain_freed_memory: a freed block is reused without page faults, in the main thread and in a thread
started later (as XLA's workers are), where by default glibc unmaps it and the next one faults every page in again;
nothing is set where JAX may use an accelerator."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

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


def test_nothing_is_set_where_an_accelerator_plugin_is_installed(tmp_path):
  """A PJRT plugin in the jax_plugins namespace (as jax-cuda13-plugin installs one): hostmem leaves malloc alone,
  unless JAX_PLATFORMS pins the CPU."""
  (tmp_path / "jax_plugins" / "xla_fake").mkdir(parents=True)
  (tmp_path / "jax_plugins" / "xla_fake" / "__init__.py").write_text("")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
  check = (
    "from sparse_detr_jax import hostmem; print(hostmem.jax_may_use_an_accelerator(), hostmem.retain_freed_memory())"
  )

  def ask(**extra) -> str:
    cmd = [sys.executable, "-c", check]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env={**env, **extra}).stdout.strip()

  assert ask() == "True False"  # (plugin found, nothing set)
  assert ask(JAX_PLATFORMS="cuda,cpu") == "True False"
  assert ask(JAX_PLATFORMS="cpu").startswith("False ")  # set where glibc has mallopt
