"""The sparsity payoff: Sparse DETR rho 0.1 ... 0.5 against Deformable DETR + top-k & BBR (rho 0).

    python benchmarks/sparsity_payoff.py [--height 800 --width 1066] [--backbone r50|swint]

Prints GFLOPs (multiply-adds) and batch-4 FPS for each rho, and their ratios to rho 0 measured in the
same run. Paper (R50, V100): GFLOPs 105.4 vs 177.3 (ratio 0.59), B4FPS 26.5 vs 18.2 (ratio 1.46) at rho 0.1.
"""

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_detr_jax import benchmark
from sparse_detr_jax import config as config_lib


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--height", type=int, default=800)
  p.add_argument("--width", type=int, default=1066)
  p.add_argument("--backbone", default="r50", choices=("r50", "swint"))
  p.add_argument("--min_seconds", type=float, default=3.0)
  a = p.parse_args()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  names = [f"{a.backbone}_efficient_detr"] + [f"{a.backbone}_sparse_detr_rho_0.{i}" for i in range(1, 6)]
  rows = []
  for name in names:
    cfg = config_lib.load_config_file(os.path.join(root, "configs", name + ".py"))
    r = benchmark.measure(cfg.model, a.height, a.width, batch_sizes=(4,), min_seconds=a.min_seconds)
    rows.append((name, cfg.model.rho, r))
    print(f"measured {name}: {r}", flush=True)
  base = rows[0][2]
  print(f"\n{jax.devices()[0].device_kind} ({jax.default_backend()}), canvas {a.height}x{a.width}")
  print(f"{'config':30s} {'rho':>4s} {'GFLOPs':>8s} {'x rho0':>7s} {'B4 FPS':>8s} {'x rho0':>7s}")
  for name, rho, r in rows:
    print(
      f"{name:30s} {rho:4.1f} {r['gflops']:8.1f} {r['gflops'] / base['gflops']:7.3f} "
      f"{r['fps_b4']:8.3f} {r['fps_b4'] / base['fps_b4']:7.3f}"
    )


if __name__ == "__main__":
  main()
