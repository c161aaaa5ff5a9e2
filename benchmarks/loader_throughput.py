"""Images/s of the training input pipeline (official COCO train transform, COCO-sized images).

    .venv/bin/python benchmarks/loader_throughput.py [--images 96] [--batch 4]

Writes a shapes dataset with 600-640 pixel images (COCO's sizes) to a temporary directory, then
times host-local batches (decode, augment, normalise, pad to a bucket) with 0 (in-process), 1 and 2
grain worker processes; the ratio column is against the in-process loader of the same run.
"""

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np

from sparse_detr_jax import config as config_lib
from sparse_detr_jax.data import pipeline, shapes, sources


def write_dataset(root: pathlib.Path, n: int) -> None:
  rng = np.random.default_rng(0)
  (root / "train").mkdir(parents=True)
  (root / "annotations").mkdir()
  images, anns = [], []
  for k in range(n):
    img, objects = shapes.draw_image(rng, long_side=(600, 640))
    img.save(root / "train" / f"{k}.jpg", quality=90)
    images.append({"id": k + 1, "file_name": f"{k}.jpg", "width": img.width, "height": img.height})
    anns += [
      {"id": len(anns) + 1, "image_id": k + 1, "category_id": c, "bbox": b, "iscrowd": 0, "area": 1} for c, b in objects
    ]
  (root / "annotations" / "instances_train.json").write_text(
    json.dumps({"images": images, "annotations": anns, "categories": shapes.CATEGORIES})
  )


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=96)
  p.add_argument("--batch", type=int, default=4)
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    write_dataset(pathlib.Path(tmp), a.images)
    d = config_lib.data_config(coco_dir=tmp, train_images="train", train_annotations="annotations/instances_train.json")
    src = sources.build_source(d, "train")
    n_batches = a.images // a.batch
    print("| workers | images/s | vs in-process |\n|---|---|---|")
    base = None
    for workers in (0, 1, 2):
      it = pipeline.iterate(pipeline.train_dataset(src, d, a.batch, seed=0, num_batches=n_batches + 2), workers)
      next(it), next(it)  # warm-up: worker start and first plans
      t = time.perf_counter()
      for _ in range(n_batches):
        next(it)
      rate = n_batches * a.batch / (time.perf_counter() - t)
      it.close()  # stops the worker processes and frees their shared memory
      base = base or rate
      print(f"| {workers} | {rate:.1f} | {rate / base:.2f} |")


if __name__ == "__main__":
  main()
