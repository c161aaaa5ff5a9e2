"""Padding waste (padded pixels / all canvas pixels) of the bucketed batches on COCO-like image sizes.

    .venv/bin/python benchmarks/padding_waste.py [--images 20000] [--global_batch 16 32]

Sizes are drawn from a COCO train2017-like distribution (longer side 640 for ~93% of images; 4:3
dominates; ~25% portrait), then planned by the official train and val transforms exactly as the
loader does (no pixels needed). Compared against one square max_size x max_size canvas, the padding
a static-shape pipeline without buckets needs, and against per-batch max padding (the official
dynamic shapes, which recompile on every new shape under jit).
"""

import argparse

import numpy as np

from sparse_detr_jax import config as config_lib
from sparse_detr_jax.data import pipeline, transforms


def coco_like_sizes(n: int, rng: np.random.Generator) -> np.ndarray:
  """(n, 2) (width, height) resembling COCO train2017."""
  longer = rng.choice([640, 500, 612], p=[0.93, 0.05, 0.02], size=n)
  ratio = rng.choice([0.75, 0.667, 0.5625, 0.8, 0.6, 1.0], p=[0.55, 0.2, 0.08, 0.06, 0.06, 0.05], size=n)
  shorter = np.round(longer * ratio).astype(int)
  portrait = rng.random(n) < 0.25
  return np.stack([np.where(portrait, shorter, longer), np.where(portrait, longer, shorter)], 1)


def waste(planner: pipeline.Planner, hw: np.ndarray, epochs: int) -> tuple[float, float]:
  """(bucketed waste, official waste) over `epochs` epochs of planned batches.

  Official: random batches of the same images padded to their per-batch maximum (dynamic shapes).
  """
  used = canvas = dyn_used = dyn = 0.0
  for e in range(epochs):
    plans, batches = planner.epoch(e)
    out = np.array([transforms.output_hw(p, int(h), int(w)) for p, (h, w) in zip(plans, hw, strict=True)])
    for b in batches:
      idx = b.indices[b.indices >= 0]
      bh, bw = planner.spec.buckets[b.bucket]
      used += out[idx].prod(1).sum()
      canvas += bh * bw * len(b.indices)
    g = planner.global_batch
    order = np.random.default_rng(e).permutation(len(out))
    for s in range(0, len(order) - g + 1, g):
      o = out[order[s : s + g]]
      dyn_used += o.prod(1).sum()
      dyn += o[:, 0].max() * o[:, 1].max() * g
  return 1 - used / canvas, 1 - dyn_used / dyn


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=20000)
  p.add_argument("--global_batch", type=int, nargs="+", default=[8, 16, 32])
  a = p.parse_args()
  wh = coco_like_sizes(a.images, np.random.default_rng(0))
  hw = wh[:, ::-1]
  spec = pipeline.data_spec(config_lib.data_config())
  square = spec.max_size**2
  print(f"buckets (h, w): {spec.buckets}")
  print(
    "| split | global batch | bucketed waste | official random batches, per-batch max (dynamic shapes) "
    "| one square canvas waste |"
  )
  print("|---|---|---|---|---|")
  for split in ("train", "val"):
    for g in a.global_batch:
      planner = pipeline.Planner(wh, spec, g, seed=0, train=split == "train")
      ours, dyn = waste(planner, hw, epochs=2 if split == "train" else 1)
      plans = planner.epoch(0)[0]
      out = np.array([transforms.output_hw(p, int(h), int(w)) for p, (h, w) in zip(plans, hw, strict=True)])
      sq = 1 - out.prod(1).mean() / square
      print(f"| {split} | {g} | {ours:.1%} | {dyn:.1%} | {sq:.1%} |")


if __name__ == "__main__":
  main()
