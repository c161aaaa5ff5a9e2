"""COCO evaluation: data-parallel prediction, official post-processing, pycocotools COCOeval.

`evaluate` runs the model over every image of a source (eval batches, see data.pipeline), turns
outputs into the top-100 detections in original-image pixels (postprocess.py), gathers them on
every host, and scores them with COCOeval (bbox) against the source's ground truth. COCOeval scores the
categories of the ground truth only: detections of other ids (the official heads' unused ones) count for nothing.
"""

import contextlib
import io
import json
import logging
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sparse_detr_jax import loop, postprocess
from sparse_detr_jax.data import pipeline

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def ground_truth(source) -> COCO:
  """pycocotools COCO of a source's annotations (crowd objects included, as COCOeval needs them)."""
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = source.coco_dataset()
    coco.createIndex()
  return coco


def make_predict(model, mesh: Mesh, num_detections: int = postprocess.NUM_DETECTIONS):
  """jitted (variables, image, padding_mask, orig_size) -> detections, one shard per device."""

  def per_device(variables, image, padding_mask, orig_size):
    out = model.apply(variables, image, padding_mask)
    return postprocess.postprocess(out, orig_size, num_detections)

  return jax.jit(
    jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")), out_specs=P("data"))
  )


def detections_to_coco(image_ids: np.ndarray, det: dict[str, np.ndarray]) -> list[dict[str, Any]]:
  """COCO results (xywh boxes) for the slots with a real image id."""
  out = []
  for i in np.flatnonzero(image_ids >= 0):
    for s, l, b in zip(det["scores"][i], det["labels"][i], det["boxes"][i], strict=True):
      out.append(
        {
          "image_id": int(image_ids[i]),
          "category_id": int(l),
          "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
          "score": float(s),
        }
      )
  return out


def coco_eval(gt: COCO, results: list[dict[str, Any]], image_ids: list[int]) -> tuple[dict[str, float], str]:
  """(stats: the 12 numbers and per-class AP, the printed summary table)."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    dt = gt.loadRes(results) if results else COCO()
    ev = COCOeval(gt, dt, "bbox")
    ev.params.imgIds = sorted(image_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  stats = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats, strict=True)}
  precision = ev.eval["precision"][:, :, :, 0, -1]  # (iou, recall, class) at area all, maxDets 100
  for k, cat in enumerate(ev.params.catIds):
    p = precision[:, :, k]
    name = gt.cats[cat]["name"]
    stats[f"AP_per_class/{name}"] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
  return stats, buf.getvalue()


def write_metrics(path: pathlib.Path, stats: dict[str, float]) -> None:
  """Metrics as strict JSON: null where COCOeval has no value (a class without ground truth: NaN)."""
  strict = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in stats.items()}
  path.write_text(json.dumps(strict, indent=1, allow_nan=False))


def evaluate(
  model,
  variables: dict,
  source,
  data_config,
  per_device_batch: int,
  mesh: Mesh,
  workdir: str | None = None,
  tag: str = "eval",
  num_workers: int = 0,
  load: Callable[[tuple[int, int]], Any] | None = None,
) -> dict[str, float]:
  """COCO bbox metrics of `model` on `source`; writes results and metrics json under workdir (host 0).
  load(canvas): an executable of the inference function saved for that canvas (compiled.Loader), or None."""
  n_dev = mesh.devices.size
  ds = pipeline.eval_dataset(source, data_config, per_device_batch * n_dev, jax.process_index(), jax.process_count())
  jitted, executables = make_predict(model, mesh), {}
  variables = jax.device_put(variables, NamedSharding(mesh, P()))  # replicated once, as a compiled program takes them

  def predict(variables, image, padding_mask, orig_size):  # a saved executable per canvas, else compiled on use
    canvas = tuple(image.shape[1:3])
    if canvas not in executables:
      executables[canvas] = (load(canvas) if load else None) or jitted
    return executables[canvas](variables, image, padding_mask, orig_size)

  results, skipped, pending = [], 0, None

  def collect(det, image_id, skip):  # the detections of one batch, gathered from every host
    nonlocal skipped
    det, image_id, skip = multihost_utils.process_allgather((det, image_id, skip), tiled=True)
    image_id = np.where(skip > 0, -1, image_id)  # unreadable images: no detections (they stay in the GT)
    skipped += int(skip.sum())
    results.extend(detections_to_coco(np.asarray(image_id), jax.tree.map(np.asarray, det)))

  with contextlib.closing(pipeline.iterate(ds, num_workers)) as it:
    # Batch k+1 is on the devices and its prediction dispatched before batch k's detections are read.
    for g, _, _ in loop.DevicePrefetch(
      it, mesh, ("image", "padding_mask", "orig_size", "image_id", "skipped"), with_state=False
    ):
      det = predict(variables, g["image"], g["padding_mask"], g["orig_size"])
      if pending is not None:
        collect(*pending)
      pending = (det, g["image_id"], g["skipped"])
  if pending is not None:
    collect(*pending)
  stats, table = coco_eval(ground_truth(source), results, list(source.image_ids))
  missing = getattr(source, "skipped_images", 0)  # left out when the annotation file was read (missing files)
  stats["skipped_images"] = skipped + missing
  logging.info(
    "%s on %d images (%d unreadable, %d missing): AP %.4f, AP50 %.4f",
    tag, len(source), skipped, missing, stats["AP"], stats["AP50"],
  )  # fmt: skip
  print(table, end="")
  if workdir and jax.process_index() == 0:
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}_results.json").write_text(json.dumps(results))
    write_metrics(out / f"{tag}_metrics.json", stats)
    logging.info("wrote %s and %s", out / f"{tag}_metrics.json", out / f"{tag}_results.json")
  return stats
