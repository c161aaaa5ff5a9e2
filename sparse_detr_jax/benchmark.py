"""Model cost on whatever device JAX sees: parameters, GFLOPs (XLA cost analysis), frames per second.

    python -m sparse_detr_jax.benchmark --config configs/r50_sparse_detr_rho_0.1.py [--height 800 --width 1066]

GFLOPs are XLA's flop count of the compiled forward at batch 1 divided by 2, i.e. multiply-adds, the
unit fvcore (used by the paper) reports. FPS is images per second of the jitted forward at batch 1
and 4, warm, synchronised with block_until_ready, on random weights (speed does not depend on them).
The last line is machine-readable: params_m=<float> gflops=<float> fps_b1=<float> fps_b4=<float>.
"""

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from sparse_detr_jax import config as config_lib
from sparse_detr_jax import hostmem
from sparse_detr_jax import model as model_lib


def random_inputs(batch: int, height: int, width: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Random images (B, H, W, 3) and an all-valid padding mask (B, H, W)."""
  images = jax.random.normal(jax.random.PRNGKey(1), (batch, height, width, 3), jnp.float32)
  return images, jnp.zeros((batch, height, width), bool)


def forward_flops(apply, variables, height: int, width: int) -> float:
  """XLA's flop count of the compiled batch-1 forward."""
  compiled = apply.lower(variables, *random_inputs(1, height, width)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def images_per_second(
  apply, variables, batch: int, height: int, width: int, min_seconds: float = 3.0, min_iters: int = 3
) -> float:
  """Warm, synchronised throughput of the jitted forward."""
  images, mask = random_inputs(batch, height, width)
  jax.block_until_ready(apply(variables, images, mask))  # compile + warm-up
  iters, start = 0, time.perf_counter()
  while iters < min_iters or time.perf_counter() - start < min_seconds:
    jax.block_until_ready(apply(variables, images, mask))
    iters += 1
  return batch * iters / (time.perf_counter() - start)


def measure(
  model_config: ml_collections.ConfigDict,
  height: int,
  width: int,
  batch_sizes: Sequence[int] = (1, 4),
  min_seconds: float = 3.0,
) -> dict[str, float]:
  """params_m, gflops (multiply-adds) and fps_b<N> of one model config at one canvas size."""
  model = model_lib.build_model(model_config)
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  apply = jax.jit(model.apply)
  out = {
    "params_m": sum(x.size for x in jax.tree_util.tree_leaves(variables["params"])) / 1e6,
    "gflops": forward_flops(apply, variables, height, width) / 2 / 1e9,
  }
  for b in batch_sizes:
    out[f"fps_b{b}"] = images_per_second(apply, variables, b, height, width, min_seconds)
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description="Sparse DETR cost: params, GFLOPs, FPS")
  p.add_argument("--config", required=True, help="config file, e.g. configs/r50_sparse_detr_rho_0.1.py")
  p.add_argument("--height", type=int, default=800)
  p.add_argument("--width", type=int, default=1066)
  p.add_argument("--min_seconds", type=float, default=3.0, help="timing duration per batch size")
  p.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16 (parameters stay float32)")
  a = p.parse_args(argv)
  hostmem.retain_freed_memory()  # as evaluate.py
  cfg = config_lib.load_config_file(a.config)
  if a.dtype:
    cfg.model.dtype = a.dtype
  r = measure(cfg.model, a.height, a.width, min_seconds=a.min_seconds)
  print(
    f"{a.config} ({cfg.model.dtype}) on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
    f"canvas {a.height}x{a.width}"
  )
  print(f"params_m={r['params_m']:.2f} gflops={r['gflops']:.1f} fps_b1={r['fps_b1']:.3f} fps_b4={r['fps_b4']:.3f}")


if __name__ == "__main__":
  main()
