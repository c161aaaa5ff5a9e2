"""XLA flags the command-line programs set on GPUs, before JAX starts a backend.

`--xla_gpu_enable_triton_gemm=false`: XLA:GPU fuses the decoder self-attention's output transpose into a Triton GEMM
whose rows merge 300 queries with the images of the batch ((B x 300, 256) @ (256, 256)); with 4 images per GPU
(1200 rows) its tiler finds no tile sizes for that fusion and the compile fails ("Couldn't find output tile sizes
that satisfy hlo ... out_proj"), seen compiling for an H100 without the device (no autotuning: the default Triton
configuration). cuBLAS takes those GEMMs instead. Set XLA_FLAGS with any value of the flag to override it.
"""

import os

from sparse_detr_jax import hostmem

GPU_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def set_gpu_flags(force: bool = False) -> None:
  """Add GPU_FLAGS to XLA_FLAGS where JAX may use a GPU (or with `force`), each unless XLA_FLAGS already names it;
  on a CPU-only installation nothing changes."""
  if not (force or hostmem.jax_may_use_an_accelerator()):
    return
  current = os.environ.get("XLA_FLAGS", "")
  missing = [f for f in GPU_FLAGS if f.split("=")[0] not in current]
  if missing:
    os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
