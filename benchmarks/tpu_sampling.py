"""Deformable sampling on a TPU, by XLA:TPU's cost model: formulations of `deformable_attention.deformable_sample`,
forward and backward, compiled on this machine for a TPU (libtpu, `make install-libtpu`; no TPU needed). Estimates,
not measurements.

    .venv/bin/python benchmarks/tpu_sampling.py [--topology v5e-4] [--queries 2223,300] [--dtype bfloat16]
        [--height 800 --width 1333] [--batch 4]

Shapes as one layer of the r50 config at that canvas: 4 levels (strides 8 to 64), 8 heads of 32 channels, 4 points
per level; 2223 queries are the rho 0.1 encoder's kept tokens at 800x1333, 300 the decoder's. One row per
(queries, formulation): estimated ms of the forward and of a training step's share (the output and the three
gradients, as the step computes them), scheduled instructions, compile seconds, temporary memory, and `unpriced`:
the executions XLA gives no cycles (its row gathers and scatter-adds are custom fusions it does not price;
`costmodel.py`), left out of the estimate. The formulations:
- gather: `gather_sample` (blocks of `QUERY_CHUNK` queries);
- gather/N: the same in blocks of N queries (with fewer corners a gather, XLA fuses the gathered rows into their
  weighted sum and drops the relayout of the rows it otherwise prices);
- separable: `separable_sample`, matrix products, no gather;
- level0-gather: level 0 gathered, levels 1-3 separable (the products cost in proportion to a level's size).
The ratios of each to the gather's step share close each query count. `LIBTPU_INIT_ARGS` reaches the compiler, e.g.
`--xla_tpu_offload_gather_to_sparsecore=true` on v5p and v6e (XLA then gives the offloaded gather no price).
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


def formulations(shapes: list[tuple[int, int]], query_chunk: int, small_block: int) -> dict:
  """name -> f(value (B, N, M, D), locations, weights) -> (B, Q, M * D), the sum `deformable_sample` computes, in
  blocks of `query_chunk` queries (`small_block` for gather/N)."""
  from sparse_detr_jax import deformable_attention as da  # pylint: disable=import-outside-toplevel

  def level0_gather(value, locations, weights):  # level 0 by its corners, levels 1.. by products
    n0 = shapes[0][0] * shapes[0][1]
    part = lambda sample, v, lv: sample(v, shapes[lv], locations[:, :, :, lv], weights[:, :, :, lv], query_chunk)
    out = part(da.gather_sample, value[:, :n0], slice(0, 1)).astype("float32")
    return (out + part(da.separable_sample, value[:, n0:], slice(1, None))).astype(value.dtype)

  return {
    "gather": lambda v, loc, w: da.gather_sample(v, shapes, loc, w, query_chunk),
    f"gather/{small_block}": lambda v, loc, w: da.gather_sample(v, shapes, loc, w, small_block),
    "separable": lambda v, loc, w: da.separable_sample(v, shapes, loc, w, query_chunk),
    "level0-gather": level0_gather,
  }


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
  print("| queries | formulation | fwd ms | fwd + bwd ms | instructions | compile s | temp GiB | unpriced |")
  print("|---|---|---|---|---|---|---|---|")
  for q in map(int, a.queries.split(",")):
    args = (spec(b, n, m, d, dt=dtype), spec(b, q, m, levels, points, 2), spec(b, q, m, levels, points, dt=dtype))
    cot = spec(b, q, m * d, dt=dtype)
    totals = {}
    for name, fwd in formulations(shapes, da.QUERY_CHUNK, small_block=max(1, q // 8)).items():
      both = lambda v, loc, w, g, fwd=fwd: (lambda out, vjp: (out, vjp(g)))(*jax.vjp(fwd, v, loc, w))
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
        f"{sum(e_both.instructions.values())} | {seconds:.1f} | {temp:.2f} | {sum(e_both.unpriced.values())} |",
        flush=True,
      )
    ratios = ", ".join(f"{k} {t / totals['gather']:.2f}x" for k, t in totals.items() if k != "gather")
    print(f"{q} queries, fwd + bwd against the gather's (priced parts): {ratios}")


if __name__ == "__main__":
  sys.exit(main())
