"""Static-shape batches: canvas buckets, size-grouped batch plans and padding.

Every batch is padded to one of the configured canvases ("buckets", (H, W) pairs), so the jitted
step compiles once per bucket. Images are grouped by the smallest bucket that holds their
transformed size (known from the plan before decoding), so landscape and portrait images, and
small and large scales, do not share a canvas. The per-image augmentation distribution is the
official one; only which images share a batch changes (as in length-bucketed sequence models).
"""
import dataclasses

import numpy as np


def check_buckets(
  buckets, max_side_short: int, max_size: int, what: str = "config data.buckets"
) -> list[tuple[int, int]]:
  """Validated buckets; error (naming them as `what`) unless some bucket holds every image the transforms can
  produce.

  Outputs have shorter side <= `max_side_short` and longer side <= `max_size`, in both orientations.
  """
  bs = [tuple(int(v) for v in b) for b in buckets]
  if not bs or any(len(b) != 2 or min(b) <= 0 for b in bs):
    raise ValueError(f"{what} must be a non-empty list of (height, width), got {buckets!r}")
  for need in ((max_side_short, max_size), (max_size, max_side_short)):
    if not any(b[0] >= need[0] and b[1] >= need[1] for b in bs):
      raise ValueError(f"{what} {bs} cannot hold a {need[0]}x{need[1]} (h x w) image, which "
                       f"the transforms produce (shorter side up to {max_side_short}, longer side up to "
                       f"max_size={max_size}): add a canvas at least that large")
  return sorted(set(bs), key=lambda b: (b[0] * b[1], b))


def smallest_bucket(hw: np.ndarray, buckets: list[tuple[int, int]]) -> np.ndarray:
  """Index of the smallest-area bucket holding each (h, w) in `hw` (n, 2); buckets sorted by area."""
  b = np.asarray(buckets)                                         # (nb, 2)
  fits = (hw[:, None, 0] <= b[None, :, 0]) & (hw[:, None, 1] <= b[None, :, 1])  # (n, nb)
  if not fits.any(1).all():
    bad = hw[~fits.any(1)][0]
    raise ValueError(f"an image of {bad[0]}x{bad[1]} fits no bucket in {buckets}")
  return fits.argmax(1)


@dataclasses.dataclass
class BatchPlan:
  bucket: int          # index into the sorted buckets
  indices: np.ndarray  # (global_batch,) source indices; -1 marks a padding slot (evaluation only)


def group_batches(order: np.ndarray, hw: np.ndarray, buckets: list[tuple[int, int]], global_batch: int,
                  drop_remainder: bool, move_up: bool = True) -> list[BatchPlan]:
  """Batches of `global_batch` images in `order`, each from one bucket.

  Leftovers of a bucket move up to the smallest larger bucket that contains it (unless not `move_up`:
  then every image stays on its smallest canvas, so its result does not depend on the other images);
  what is left in a bucket is then dropped (training) or padded with -1 slots (evaluation).
  """
  home = smallest_bucket(hw[order], buckets)                          # (n,)
  pending: list[list[int]] = [list(order[home == k]) for k in range(len(buckets))]
  out: list[BatchPlan] = []
  for k, (bh, bw) in enumerate(buckets):
    items = pending[k]
    full = len(items) - len(items) % global_batch
    for s in range(0, full, global_batch):
      out.append(BatchPlan(k, np.asarray(items[s:s + global_batch], np.int64)))
    rest = items[full:]
    if not rest:
      continue
    up = [j for j in range(k + 1, len(buckets)) if move_up and buckets[j][0] >= bh and buckets[j][1] >= bw]
    if up:
      pending[up[0]].extend(rest)
    elif not drop_remainder:
      out.append(BatchPlan(k, np.asarray(rest + [-1] * (global_batch - len(rest)), np.int64)))
  return out


def num_maximal(buckets: list[tuple[int, int]]) -> int:
  """Buckets no other bucket contains: each can drop up to global_batch - 1 images per epoch."""
  return sum(not any(o != b and o[0] >= b[0] and o[1] >= b[1] for o in buckets) for b in buckets)


def pad_batch(images: list[np.ndarray], boxes: list[np.ndarray], labels: list[np.ndarray],
              canvas: tuple[int, int], max_boxes: int) -> dict[str, np.ndarray]:
  """Pad images to `canvas` and targets to `max_boxes`.

  Returns image (B, H, W, 3) float32 (zeros outside the image, as the official NestedTensor),
  padding_mask (B, H, W) bool (True = padding), labels (B, M) int32, boxes (B, M, 4) float32
  (cxcywh over the unpadded image), box_valid (B, M) bool.
  """
  b, (hh, ww) = len(images), canvas
  out = {"image": np.zeros((b, hh, ww, 3), np.float32), "padding_mask": np.ones((b, hh, ww), bool),
         "labels": np.zeros((b, max_boxes), np.int32), "boxes": np.zeros((b, max_boxes, 4), np.float32),
         "box_valid": np.zeros((b, max_boxes), bool)}
  for i, (img, bx, lb) in enumerate(zip(images, boxes, labels)):
    h, w = img.shape[:2]
    out["image"][i, :h, :w] = img
    out["padding_mask"][i, :h, :w] = False
    n = len(lb)
    out["labels"][i, :n], out["boxes"][i, :n], out["box_valid"][i, :n] = lb, bx, True
  return out
