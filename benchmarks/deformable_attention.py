"""Multi-scale deformable sampling alone: this project's gather-based op vs PyTorch grid_sample.

    python benchmarks/deformable_attention.py [--repeats 5]

Encoder shapes of an 800x1066 canvas with ResNet-50 (levels 100x134, 50x67, 25x34, 13x17; N = 17821
tokens), 8 heads x 32 channels, 4 levels x 4 points, batch 1; queries = all tokens (rho 1.0) or the
top 10% (rho 0.1). PyTorch runs the official `ms_deform_attn_core_pytorch` formulation (grid_sample,
align_corners=False, zero padding). Forward, and forward + backward (gradients of value, locations,
weights). Both on the CPU here, same threads; ratios are PyTorch time / JAX time, measured in one run.
Needs the `convert` extra (torch).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_detr_jax.deformable_attention import deformable_sample

SHAPES = ((100, 134), (50, 67), (25, 34), (13, 17))
M, D, L, P = 8, 32, 4, 4


def torch_sample(value, locations, weights):
  """The official pure-PyTorch deformable attention core."""
  n, _, m, d = value.shape
  _, q, _, l, p, _ = locations.shape
  values = value.split([h * w for h, w in SHAPES], dim=1)
  grids = 2 * locations - 1
  sampled = []
  for lid, (h, w) in enumerate(SHAPES):
    v = values[lid].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
    g = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
    sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
  attn = weights.transpose(1, 2).reshape(n * m, 1, q, l * p)
  out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1).view(n, m * d, q)
  return out.transpose(1, 2).contiguous()


def timed(fn, repeats):
  fn()  # warm-up (and compile)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def compare(rho: float, value: np.ndarray, rng: np.random.Generator, repeats: int) -> None:
  """Print the forward and forward+backward rows of one keeping ratio."""
  n = value.shape[1]
  q = n if rho == 1.0 else int(n * rho) + 1
  loc = rng.uniform(-0.05, 1.05, size=(1, q, M, L, P, 2)).astype(np.float32)
  w = rng.uniform(size=(1, q, M, L, P)).astype(np.float32)
  w /= w.sum(axis=(3, 4), keepdims=True)
  cot = rng.normal(size=(1, q, M * D)).astype(np.float32)

  fwd = jax.jit(lambda v, l_, w_: deformable_sample(v, SHAPES, l_, w_))
  bwd = jax.jit(jax.grad(lambda v, l_, w_: jnp.sum(deformable_sample(v, SHAPES, l_, w_) * cot), argnums=(0, 1, 2)))
  jv, jl, jw = jnp.asarray(value), jnp.asarray(loc), jnp.asarray(w)
  t_jf = timed(lambda: jax.block_until_ready(fwd(jv, jl, jw)), repeats)
  t_jb = timed(lambda: jax.block_until_ready(bwd(jv, jl, jw)), repeats)

  tv, tl, tw = (torch.from_numpy(x).requires_grad_() for x in (value, loc, w))
  tc = torch.from_numpy(cot)

  def torch_fwd():
    with torch.no_grad():
      return torch_sample(tv, tl, tw)

  def torch_bwd():
    for t in (tv, tl, tw):
      t.grad = None
    (torch_sample(tv, tl, tw) * tc).sum().backward()

  t_tf = timed(torch_fwd, repeats)
  t_tb = timed(torch_bwd, repeats)
  diff = float(np.max(np.abs(np.asarray(fwd(jv, jl, jw)) - torch_fwd().numpy())))
  for name, tj, tt in (("fwd", t_jf, t_tf), ("fwd+bwd", t_jb, t_tb)):
    print(f"{rho:4.1f} {q:8d} {name:>8s} {tj * 1e3:9.1f} {tt * 1e3:9.1f} {tt / tj:9.2f}  {diff:.1e}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--repeats", type=int, default=5)
  a = ap.parse_args()
  n = sum(h * w for h, w in SHAPES)
  rng = np.random.default_rng(0)
  value = rng.normal(size=(1, n, M, D)).astype(np.float32)
  print(f"{jax.devices()[0].device_kind}, torch threads {torch.get_num_threads()}, N = {n}")
  print(f"{'rho':>4s} {'queries':>8s} {'pass':>8s} {'jax ms':>9s} {'torch ms':>9s} {'torch/jax':>9s}  max |diff|")
  for rho in (1.0, 0.1):
    compare(rho, value, rng, a.repeats)


if __name__ == "__main__":
  main()
