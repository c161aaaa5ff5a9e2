"""Detect objects in image files: a command line over `Detector`.

    python -m sparse_detr_jax.predict (--checkpoint PATH | --workdir DIR) [--config configs/NAME.py] \\
        [--threshold 0.5] [--batch_size 1] [--out DIR] [--mechanism] IMAGE_OR_FOLDER...

PATH is what Detector.from_checkpoint takes: an official .pth, a converted directory, a training
checkpoint step (or give the training --workdir). The model and its category names come from the checkpoint
(a training run's labels.json, COCO's for an official model), whatever the working directory; detections are
of those categories only. --config gives the transform and canvases (default: the workdir's config, else the
official COCO evaluation settings); --labels names the categories of a checkpoint that carries no names.
Images are read upright by their EXIF orientation. Writes OUT/detections.json (per image: file, width, height
and detections {box [x0, y0, x1, y1] in pixels clipped to the image, score, category_id, category}, or an error for a
file that cannot be decoded), OUT/<name>.png with the detections drawn, and with --mechanism
OUT/<name>_mechanism.png: Sparse DETR's kept encoder tokens and decoder attention map per feature level.
"""

import json
import os
import pathlib
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from sparse_detr_jax import cli, logs, loop
from sparse_detr_jax.data import sources
from sparse_detr_jax.detector import Detector

CHUNK = 16  # images decoded and held in memory at a time

config_flags.DEFINE_config_file(
  "config",
  None,
  "a config file whose data block gives the transform and canvases (the model is the checkpoint's)",
  lock_config=True,
)
flags.DEFINE_string("workdir", None, "a training workdir: use its latest checkpoint and config")
flags.DEFINE_string("checkpoint", None, "official .pth, converted directory or checkpoint step directory")
flags.DEFINE_string(
  "labels", None, "category names for a checkpoint without them: a labels.json or a COCO annotation file"
)
flags.DEFINE_float("threshold", 0.5, "keep detections scoring at least this")
flags.DEFINE_integer("batch_size", 1, "images per compiled call")
flags.DEFINE_string("out", "predictions", "output directory")
flags.DEFINE_bool("mechanism", False, "also write <name>_mechanism.png: kept tokens and decoder attention per level")
flags.DEFINE_string("compilation_cache_dir", loop.DEFAULT_CACHE_DIR, "JAX's persistent compilation cache ('' = off)")
FLAGS = flags.FLAGS


def picture_names(paths: list[str]) -> list[str]:
  """A distinct picture name per path (its stem; _1, _2 ... when two folders hold the same file name: each
  detections.json entry names its picture)."""
  used: set[str] = set()
  names = []
  for p in paths:
    name = stem = pathlib.Path(p).stem
    k = 0
    while name in used:
      k += 1
      name = f"{stem}_{k}"
    used.add(name)
    names.append(name)
  return names


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def expand(paths: list[str]) -> list[str]:
  """Image files and folders -> files: a folder stands for its image files (by suffix), sorted by name."""
  files = []
  for p in paths:
    path = pathlib.Path(p)
    if path.is_dir():
      found = sorted(str(f) for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
      if not found:
        raise FileNotFoundError(f"{p}: a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
      files += found
    else:
      files.append(p)
  return files


def predict(detector: Detector, paths: list[str], out_dir: str, threshold: float, mechanism: bool) -> list[dict]:
  """Run `detector` on image files; write pictures to out_dir and return the detections.json entries (a file
  that is not a readable image gets an entry with its error; a missing one stops everything before any work)."""
  files = sources.ImageFiles(paths, record_unreadable=True)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  names = picture_names(paths)
  results: list[dict[str, Any]] = []
  for start in range(0, len(paths), CHUNK):
    images, entries = [], []
    for i in range(start, min(start + CHUNK, len(paths))):
      w, h = (int(v) for v in files.sizes[i])
      results.append({"file": paths[i], "width": w, "height": h})
      if i in files.errors:
        results[-1]["error"] = files.errors[i]
        logging.warning("%s", files.errors[i])
        continue
      try:
        images.append(files.image(i))
        entries.append((results[-1], names[i]))
      except sources.SampleError as e:
        results[-1]["error"] = str(e)
        logging.warning("%s", e)
    for image, (entry, name), detections in zip(
      images, entries, detector(images, threshold) if images else [], strict=True
    ):
      entry["detections"] = detections
      entry["picture"] = str(out / f"{name}.png")
      detector.draw(image, detections).save(entry["picture"])
      if mechanism:
        entry["mechanism_picture"] = str(out / f"{name}_mechanism.png")
        detector.mechanism(image).save(entry["mechanism_picture"])
  (out / "detections.json").write_text(json.dumps(results, indent=1))
  return results


def main(argv: list[str]) -> None:
  if not argv[1:]:
    cli.usage_error("give one or more image files or folders")
  if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
    cli.usage_error("give --workdir or --checkpoint (one of them)")
  if not 0.0 <= FLAGS.threshold <= 1.0:
    cli.usage_error(f"--threshold: expected a score in [0, 1], got {FLAGS.threshold}")
  if FLAGS.batch_size < 1:
    cli.usage_error(f"--batch_size: expected at least 1, got {FLAGS.batch_size}")
  paths = expand(argv[1:])  # a missing file or an empty folder: one line, exit 2 (cli.run)
  logs.quiet_library_logs()
  loop.enable_compilation_cache(FLAGS.compilation_cache_dir)
  detector = Detector.from_checkpoint(FLAGS.checkpoint or FLAGS.workdir, FLAGS.config, FLAGS.batch_size, FLAGS.labels)
  results = predict(detector, paths, FLAGS.out, FLAGS.threshold, FLAGS.mechanism)
  for r in results:
    logging.info("%s: %s", r["file"], r.get("error") or f"{len(r['detections'])} detections")
  pictures = sum(("picture" in r) + ("mechanism_picture" in r) for r in results)
  failed = sum("error" in r for r in results)
  print(
    f"wrote {os.path.join(FLAGS.out, 'detections.json')} ({len(results)} image{'s' if len(results) != 1 else ''}"
    + (f", {failed} unreadable" if failed else "")
    + f") and {pictures} picture{'s' if pictures != 1 else ''}"
  )


if __name__ == "__main__":
  cli.run(main)
