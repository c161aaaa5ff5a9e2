"""GPU flags: added where JAX may use a GPU, never twice, never over a value the user chose, nothing on a CPU-only
installation."""

import os

from sparse_detr_jax import xla_flags


def test_added_once_and_never_over_the_users_value(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  xla_flags.set_gpu_flags(force=True)
  xla_flags.set_gpu_flags(force=True)

  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_gpu_enable_triton_gemm=false"
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
  xla_flags.set_gpu_flags(force=True)
  assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"


def test_nothing_where_jax_runs_on_the_cpu_alone(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  xla_flags.set_gpu_flags()

  assert "XLA_FLAGS" not in os.environ
