"""The kernel gradient of ResNet-50's trained 3x3 convolutions (layer2-4): XLA's own (the convolution's VJP)
against `layers.conv_kernel_grad` (one matrix product per kernel tap), which `layers.conv2d` uses on a CPU.
Both are jitted and timed warm in this process, on random inputs.

    .venv/bin/python benchmarks/conv_kernel_grad.py [--height 384 --width 512] [--batch 2] [--iters 5]

Its last line: `xla_ms=<total> ours_ms=<total> speedup=<xla / ours> max_rel_diff=<x>` over the layers, each counted
as often as ResNet-50 has it.
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from sparse_detr_jax import layers


def resnet_3x3_layers(h: int, w: int) -> list[tuple[str, int, int, int, int, int]]:
  """(name, count, input height, input width, channels in = out, stride) of the trained 3x3 convolutions at a
  canvas h x w: each stage's first block strides on its 3x3 (torchvision v1.5), the rest keep the size."""
  out, size = [], ((h + 1) // 2 + 1) // 2  # the stem: /2 conv, /2 max pool (padding 1)
  size_w = ((w + 1) // 2 + 1) // 2
  for stage, blocks in ((2, 4), (3, 6), (4, 3)):
    width = 64 * 2 ** (stage - 1)
    out.append((f"layer{stage}_0.conv2", 1, size, size_w, width, 2))
    size, size_w = (size + 1) // 2, (size_w + 1) // 2
    out.append((f"layer{stage}_*.conv2", blocks - 1, size, size_w, width, 1))
  return out


def timed(fn, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--height", type=int, default=384)
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--iters", type=int, default=5)
  a = p.parse_args()
  print(f"{a.batch}x{a.height}x{a.width} canvas on {jax.devices()[0].device_kind} ({jax.default_backend()})")
  print("| layer | count | input | XLA ms | conv_kernel_grad ms | speed-up |\n|---|---|---|---|---|---|")
  total_xla = total_ours = worst = 0.0
  for name, count, h, w, c, s in resnet_3x3_layers(a.height, a.width):
    x = jax.random.normal(jax.random.PRNGKey(0), (a.batch, h, w, c))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, c)) * 0.01
    conv = lambda x, k, s=s: jax.lax.conv_general_dilated(
      x, k, (s, s), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    dy = jax.random.normal(jax.random.PRNGKey(2), jax.eval_shape(conv, x, kernel).shape)
    xla = jax.jit(lambda x, dy, conv=conv, kernel=kernel: jax.vjp(lambda k: conv(x, k), kernel)[1](dy)[0])
    ours = jax.jit(lambda x, dy, s=s: layers.conv_kernel_grad(x, dy, 3, s, 1))
    want, got = xla(x, dy), ours(x, dy)
    worst = max(worst, float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))))
    t_xla, t_ours = timed(xla, x, dy, iters=a.iters), timed(ours, x, dy, iters=a.iters)
    total_xla += count * t_xla
    total_ours += count * t_ours
    print(f"| {name} | {count} | {h}x{w}x{c} /{s} | {t_xla:.1f} | {t_ours:.1f} | {t_xla / t_ours:.2f}x |")
  print(
    f"xla_ms={total_xla:.1f} ours_ms={total_ours:.1f} speedup={total_xla / total_ours:.2f} max_rel_diff={worst:.1e}"
  )


if __name__ == "__main__":
  sys.exit(main())
