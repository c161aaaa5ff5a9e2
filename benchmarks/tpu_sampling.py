"""Deformable sampling on a TPU, by XLA:TPU's cost model: the gather (`deformable_attention.gather_sample`) against
the matrix-product formulation (`separable_sample`), forward and backward, compiled on this machine for a TPU
(libtpu, `make install-libtpu`; no TPU needed). Estimates, not measurements.

    .venv/bin/python benchmarks/tpu_sampling.py [--topology v5e-4] [--queries 2223,300] [--dtype bfloat16]
        [--height 800 --width 1333] [--batch 4]

Shapes as one layer of the r50 config at that canvas: 4 levels (strides 8 to 64), 8 heads of 32 channels, 4 points
per level; 2223 queries are the rho 0.1 encoder's kept tokens at 800x1333, 300 the decoder's. One row per
(queries, formulation): estimated ms forward and forward + backward (`costmodel.estimate`), scheduled instructions,
compile seconds, temporary memory, and the ratio of the separable formulation's forward + backward to the gather's.
"""

import argparse
import math
import sys
import time

from sparse_detr_jax import costmodel, preflight


def level_shapes(height: int, width: int) -> list[tuple[int, int]]:
  """The ResNet-50 levels' sizes (strides 8, 16, 32 and the extra 64) for a canvas."""
  shapes, h, w = [], height, width
  for _ in range(3):
    h, w = math.ceil(h / 2), math.ceil(w / 2)
  for _ in range(4):
    shapes.append((h, w))
    h, w = math.ceil(h / 2), math.ceil(w / 2)
  return shapes


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--topology", default="v5e-4")
  p.add_argument("--queries", default="2223,300")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--height", type=int, default=800)
  p.add_argument("--width", type=int, default=1333)
  p.add_argument("--batch", type=int, default=4, help="images per chip")
  a = p.parse_args()
  preflight._environment()  # pylint: disable=protected-access  # libtpu from .libtpu, before JAX starts
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from sparse_detr_jax import deformable_attention as da  # pylint: disable=import-outside-toplevel

  topology = preflight.parse_topology(a.topology)
  mesh = jax.sharding.Mesh(np.array(preflight.devices(topology)[:1]), ("data",))
  dtype = jnp.dtype(a.dtype)
  shapes = level_shapes(a.height, a.width)
  n, b, m, levels, points, d = sum(h * w for h, w in shapes), a.batch, 8, 4, 4, 32
  spec = lambda *s, dt=jnp.float32: jax.ShapeDtypeStruct(s, dt, sharding=NamedSharding(mesh, P()))
  print(
    f"{a.topology} ({topology.chip.clock_ghz} GHz), {a.dtype}, {a.height}x{a.width}: levels {shapes}, "
    f"{n} tokens, batch {b}; XLA:TPU's estimates, not measurements"
  )
  print("| queries | formulation | fwd ms | fwd + bwd ms | instructions | compile s | temp GiB |")
  print("|---|---|---|---|---|---|---|")
  for q in map(int, a.queries.split(",")):
    args = (spec(b, n, m, d, dt=dtype), spec(b, q, m, levels, points, 2), spec(b, q, m, levels, points, dt=dtype))
    cot = spec(b, q, m * d, dt=dtype)
    totals = {}
    for name, sample in (("gather", da.gather_sample), ("separable", da.separable_sample)):
      fwd = lambda v, loc, w, sample=sample: sample(v, shapes, loc, w)
      both = lambda v, loc, w, g, fwd=fwd: jax.vjp(fwd, v, loc, w)[1](g)
      start = time.perf_counter()
      c_both = jax.jit(both).lower(*args, cot).compile()
      c_fwd = jax.jit(fwd).lower(*args).compile()
      seconds = time.perf_counter() - start
      e_both = costmodel.estimate(c_both.as_text(), topology.chip.clock_ghz)
      e_fwd = costmodel.estimate(c_fwd.as_text(), topology.chip.clock_ghz)
      totals[name] = e_both.total_s
      temp = c_both.memory_analysis().temp_size_in_bytes / 2**30
      print(
        f"| {q} | {name} | {1e3 * e_fwd.total_s:.2f} | {1e3 * e_both.total_s:.2f} | "
        f"{sum(e_both.instructions.values())} | {seconds:.1f} | {temp:.2f} |",
        flush=True,
      )
    print(f"separable / gather, {q} queries, fwd + bwd: {totals['separable'] / totals['gather']:.2f}x")


if __name__ == "__main__":
  sys.exit(main())
