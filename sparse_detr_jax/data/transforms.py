"""The official DETR / Deformable DETR transforms, split into a plan and its application.

A plan is the list of geometric ops the official random transform would apply to one image, drawn
from a numpy Generator. Its output size follows from the image's (width, height) alone, so the
batcher can choose static canvases from the annotation metadata before any pixel is decoded; the
loader workers then apply the plan to the pixels (PIL, as the official code) and normalise.

Ops: ("hflip",), ("resize", (h, w)), ("crop", (top, left, h, w)).
Train (official make_coco_transforms('train')): RandomHorizontalFlip, then with p=0.5
RandomResize(scales, max_size), else RandomResize(crop_resize) -> RandomSizeCrop(*crop_size) ->
RandomResize(scales, max_size). Val: RandomResize([val_size], max_size).
"""
from typing import Sequence

import numpy as np
from PIL import Image

from sparse_detr_jax.data.sources import Annotations

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

Op = tuple
Plan = list[Op]


def resized_hw(h: int, w: int, size: int, max_size: int | None) -> tuple[int, int]:
  """Official get_size_with_aspect_ratio: shorter side to `size`, longer side capped near `max_size`.

  The official rounding can overshoot `max_size` by a few pixels for very elongated images; the
  longer side is clamped to `max_size` here so every output fits the configured canvases.
  """
  if max_size is not None:
    lo, hi = float(min(w, h)), float(max(w, h))
    if hi / lo * size > max_size:
      size = int(round(max_size * lo / hi))
  if (w <= h and w == size) or (h <= w and h == size):
    oh, ow = h, w
  elif w < h:
    ow, oh = size, int(size * h / w)
  else:
    oh, ow = size, int(size * w / h)
  if max_size is not None:
    oh, ow = min(oh, max_size), min(ow, max_size)
  return oh, ow


def output_hw(plan: Plan, h: int, w: int) -> tuple[int, int]:
  """Image size (h, w) after a plan, from the input size alone."""
  for op in plan:
    if op[0] in ("resize", "crop"):
      h, w = op[1][-2:]
  return h, w


def plan_train(h: int, w: int, rng: np.random.Generator, c) -> Plan:
  """Draw the official train augmentation for an (h, w) image; `c` is the config's `data` block."""
  plan: Plan = []
  if rng.random() < 0.5:
    plan.append(("hflip",))
  if rng.random() < 0.5:
    plan.append(("resize", resized_hw(h, w, int(rng.choice(c.scales)), c.max_size)))
    return plan
  h, w = resized_hw(h, w, int(rng.choice(c.crop_resize)), None)
  plan.append(("resize", (h, w)))
  lo, hi = c.crop_size
  cw = int(rng.integers(lo, min(w, hi) + 1))
  ch = int(rng.integers(lo, min(h, hi) + 1))
  top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
  plan.append(("crop", (top, left, ch, cw)))
  plan.append(("resize", resized_hw(ch, cw, int(rng.choice(c.scales)), c.max_size)))
  return plan


def plan_eval(h: int, w: int, c) -> Plan:
  """Official val transform: shorter side to `val_size`, longer side at most `max_size`."""
  return [("resize", resized_hw(h, w, c.val_size, c.max_size))]


def apply(image: np.ndarray, ann: Annotations, plan: Plan) -> tuple[np.ndarray, Annotations]:
  """Apply a plan to uint8 (H, W, 3) pixels and xyxy pixel boxes; returns uint8 (h, w, 3) and boxes."""
  img = Image.fromarray(image)
  boxes, labels = ann.boxes.copy(), ann.labels
  for op in plan:
    w, h = img.size
    if op[0] == "hflip":
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      boxes = boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32) + np.array([w, 0, w, 0], np.float32)
    elif op[0] == "resize":
      oh, ow = op[1]
      img = img.resize((ow, oh), Image.Resampling.BILINEAR)
      boxes = boxes * np.array([ow / w, oh / h, ow / w, oh / h], np.float32)
    elif op[0] == "crop":
      top, left, ch, cw = op[1]
      img = img.crop((left, top, left + cw, top + ch))
      b = (boxes - np.array([left, top, left, top], np.float32)).reshape(-1, 2, 2)
      b = np.clip(np.minimum(b, np.array([cw, ch], np.float32)), 0, None)
      keep = np.all(b[:, 1, :] > b[:, 0, :], axis=1)
      boxes, labels = b.reshape(-1, 4)[keep], labels[keep]
    else:
      raise ValueError(f"unknown transform op {op!r}")
  return np.asarray(img), Annotations(boxes.astype(np.float32), labels)


def normalize(image: np.ndarray, ann: Annotations) -> tuple[np.ndarray, np.ndarray]:
  """uint8 (h, w, 3) -> float32 ImageNet-normalised; xyxy pixel boxes -> cxcywh over (w, h)."""
  h, w = image.shape[:2]
  x = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  b = ann.boxes
  cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1)
  return x, (cxcywh / np.array([w, h, w, h], np.float32)).astype(np.float32)


def denormalize(x: np.ndarray) -> np.ndarray:
  """Inverse of `normalize` for pictures: (H, W, 3) float32 -> uint8."""
  return np.clip(np.round((x * IMAGENET_STD + IMAGENET_MEAN) * 255.0), 0, 255).astype(np.uint8)


def check_config(c) -> None:
  """Config errors in the transform settings, at start-up."""
  scales: Sequence[int] = list(c.scales)
  if not scales or min(scales) <= 0 or c.max_size < max(scales) or c.val_size > c.max_size:
    raise ValueError(f"config data: scales {scales}, val_size {c.val_size} must be positive and <= "
                     f"max_size {c.max_size}")
  lo, hi = c.crop_size
  if not 0 < lo <= hi or lo > min(c.crop_resize):
    raise ValueError(f"config data.crop_size {tuple(c.crop_size)} must satisfy 0 < min <= max and "
                     f"min <= min(crop_resize) = {min(c.crop_resize)}")
