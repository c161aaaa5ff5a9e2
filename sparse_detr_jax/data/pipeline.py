"""Loaders: deterministic epoch plans, grain worker processes, per-host shards, checkpointable state.

`train_dataset` / `eval_dataset` return a grain MapDataset of host-local batches (dicts of numpy
arrays, see `LoadBatch`); `iterate` turns one into an iterator with worker processes and prefetch
whose `get_state()` / `set_state()` resume at the next batch. Global batch k is the same on every
host (plans depend on seed, epoch and the annotation metadata only); host p takes slots
[p * L, (p + 1) * L) of it, L = global_batch / process_count. Only the functions that build grain datasets
import grain: the planning (`data_spec`, `Planner`, `LoadBatch`, `eval_batches`) runs without it.
"""
import functools
import logging
import types
from typing import TYPE_CHECKING

import numpy as np

from sparse_detr_jax.data import batching, transforms
from sparse_detr_jax.data.sources import Annotations, SampleError

if TYPE_CHECKING:
  import grain


def data_spec(data_config) -> types.SimpleNamespace:
  """A picklable copy of the config's `data` block (a ConfigDict or a plain dict), checked."""
  c = types.SimpleNamespace(**(data_config if isinstance(data_config, dict) else data_config.to_dict()))
  transforms.check_config(c)
  c.buckets = batching.check_buckets(c.buckets, max(max(c.scales), c.val_size), c.max_size)
  if c.max_boxes <= 0:
    raise ValueError(f"config data.max_boxes must be positive, got {c.max_boxes}")
  return c


class Planner:
  """Which images form global batch k, on which canvas, with which augmentation plans."""

  def __init__(self, sizes: np.ndarray, spec, global_batch: int, seed: int, train: bool, move_up: bool = True):
    self.sizes, self.spec, self.global_batch, self.seed, self.train = sizes, spec, global_batch, seed, train
    self.move_up = move_up
    n = len(sizes)
    if train:
      self.batches_per_epoch = (n - batching.num_maximal(spec.buckets) * (global_batch - 1)) // global_batch
      if self.batches_per_epoch < 1:
        raise ValueError(f"{n} training images are too few for a global batch of {global_batch}")
    else:
      self.batches_per_epoch = len(self.epoch(0)[1])

  @functools.lru_cache(maxsize=2)
  def epoch(self, e: int) -> tuple[list, list[batching.BatchPlan]]:
    """(per-image plans, batch plans) of epoch `e`; the same on every host and worker."""
    wh = self.sizes
    if not self.train:
      plans = [transforms.plan_eval(int(h), int(w), self.spec) for w, h in wh]
      order = np.arange(len(wh))
    else:
      rng = np.random.default_rng([self.seed, e])
      order = rng.permutation(len(wh))
      plans = [transforms.plan_train(int(h), int(w), rng, self.spec) for w, h in wh]
    hw = np.array([transforms.output_hw(p, int(h), int(w)) for p, (w, h) in zip(plans, wh)]).reshape(-1, 2)
    batches = batching.group_batches(order, hw, self.spec.buckets, self.global_batch, drop_remainder=self.train,
                                     move_up=self.move_up)
    if self.train:
      batches = [batches[i] for i in rng.permutation(len(batches))][:self.batches_per_epoch]
    return plans, batches

  def batch(self, k: int) -> tuple[tuple[int, int], np.ndarray, list]:
    """Canvas (H, W), source indices (global_batch,) and their plans for global batch k."""
    plans, batches = self.epoch(k // self.batches_per_epoch)
    b = batches[k % self.batches_per_epoch]
    return self.spec.buckets[b.bucket], b.indices, [plans[i] if i >= 0 else None for i in b.indices]


class LoadBatch:
  """Global batch index -> this host's padded batch.

  Keys: image (L, H, W, 3) float32, padding_mask (L, H, W) bool, labels (L, M) int32,
  boxes (L, M, 4) float32 cxcywh normalised, box_valid (L, M) bool, image_id (L,) int64 (-1: padding
  slot), orig_size (L, 2) int32 (h, w), size (L, 2) int32 (h, w) after the transform, skipped (L,)
  int32 (1: the image could not be read; an empty image stands in), truncated (L,) int32 (boxes over
  max_boxes dropped).
  """

  def __init__(self, source, planner: Planner, process_index: int, process_count: int):
    if planner.global_batch % process_count:
      raise ValueError(f"global batch {planner.global_batch} does not split over {process_count} hosts")
    self.source, self.planner = source, planner
    self.local = planner.global_batch // process_count
    self.offset = process_index * self.local

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    canvas, indices, plans = self.planner.batch(int(k))
    m = self.planner.spec.max_boxes
    images, boxes, labels = [], [], []
    n = self.local
    meta = {"image_id": np.full(n, -1, np.int64), "orig_size": np.zeros((n, 2), np.int32),
            "size": np.zeros((n, 2), np.int32), "skipped": np.zeros(n, np.int32),
            "truncated": np.zeros(n, np.int32)}
    for s in range(n):
      i, plan = int(indices[self.offset + s]), plans[self.offset + s]
      if i < 0:  # Evaluation padding slot: a blank canvas, never reported.
        images.append(np.zeros(canvas + (3,), np.float32))
        boxes.append(np.zeros((0, 4), np.float32)), labels.append(np.zeros(0, np.int32))
        continue
      w, h = (int(v) for v in self.source.sizes[i])
      meta["image_id"][s], meta["orig_size"][s] = self.source.image_ids[i], (h, w)
      meta["size"][s] = transforms.output_hw(plan, h, w)
      try:
        img, ann = transforms.apply(self.source.image(i), self.source.annotations(i), plan)
      except SampleError as e:
        logging.warning("skipping sample: %s", e)
        meta["skipped"][s] = 1
        img, ann = np.full(tuple(meta["size"][s]) + (3,), 0, np.uint8), Annotations(
            np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
      x, cxcywh = transforms.normalize(img, ann)
      if meta["skipped"][s]:
        x = np.zeros_like(x)  # The dataset mean, like a zero-padded region.
      meta["truncated"][s] = max(0, len(ann.labels) - m)
      images.append(x), boxes.append(cxcywh[:m]), labels.append(ann.labels[:m])
    return {**batching.pad_batch(images, boxes, labels, canvas, m), **meta}


def train_dataset(source, data_config, global_batch: int, seed: int, num_batches: int,
                  process_index: int = 0, process_count: int = 1) -> "grain.MapDataset":
  """`num_batches` host-local training batches over as many epochs as needed."""
  import grain  # pylint: disable=import-outside-toplevel

  planner = Planner(source.sizes, data_spec(data_config), global_batch, seed, train=True)
  return grain.MapDataset.range(num_batches).map(LoadBatch(source, planner, process_index, process_count))


def eval_batches(source, data_config, global_batch: int, process_index: int = 0, process_count: int = 1,
                 move_up: bool = True) -> tuple[int, LoadBatch]:
  """(number of batches, batch index -> host-local batch): every image once (val transform), padded to whole
  global batches with image_id -1 slots. Not `move_up`: every image on its own smallest canvas
  (batching.group_batches), for results that do not depend on which other images came with it (Detector).
  Without grain, which an exported detector's machine need not install."""
  planner = Planner(source.sizes, data_spec(data_config), global_batch, 0, train=False, move_up=move_up)
  return planner.batches_per_epoch, LoadBatch(source, planner, process_index, process_count)


def eval_dataset(source, data_config, global_batch: int, process_index: int = 0, process_count: int = 1,
                 move_up: bool = True) -> "grain.MapDataset":
  """`eval_batches` as a grain MapDataset."""
  import grain  # pylint: disable=import-outside-toplevel

  count, load = eval_batches(source, data_config, global_batch, process_index, process_count, move_up)
  return grain.MapDataset.range(count).map(load)


def iterate(dataset: "grain.MapDataset", num_workers: int, prefetch: int = 2) -> "grain.DatasetIterator":
  """Iterator with `num_workers` worker processes (0: in this process); checkpointable state."""
  import grain  # pylint: disable=import-outside-toplevel

  ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch))
  return iter(ds)
