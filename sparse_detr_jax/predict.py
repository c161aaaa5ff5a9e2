"""Detect objects in image files.

    python -m sparse_detr_jax.predict --config configs/NAME.py (--workdir DIR | --checkpoint PATH) \
        [--threshold 0.5] [--out DIR] [--mechanism] IMAGE...

PATH is a checkpoint step directory or an official Sparse DETR .pth. Images go through the config's
evaluation transform and canvases (upright by their EXIF orientation); detections are the official
post-processing's top 100 kept at `--threshold`. Writes OUT/detections.json (per image: file, size and
detections with COCO-style xywh boxes in pixels, category id and name, score) and OUT/<name>.png
with the detections drawn; with --mechanism also OUT/<name>_mechanism.png, Sparse DETR's kept encoder
tokens and decoder attention map (DAM) per feature level. Category names come from the config's val
annotation file when present, else COCO's.
"""

import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from sparse_detr_jax import evaluator, postprocess, trainer, visualize
from sparse_detr_jax.data import categories, pipeline, sources

config_flags.DEFINE_config_file("config", None, "a config file from configs/", lock_config=True)
flags.DEFINE_string("workdir", None, "a training workdir: use its latest checkpoint")
flags.DEFINE_string("checkpoint", None, "checkpoint step directory or official .pth")
flags.DEFINE_float("threshold", 0.5, "keep detections scoring at least this")
flags.DEFINE_string("out", "predictions", "output directory")
flags.DEFINE_bool("mechanism", False, "also write <name>_mechanism.png: kept tokens and decoder attention per level")
flags.mark_flag_as_required("config")
FLAGS = flags.FLAGS


def category_names(data_config: ml_collections.ConfigDict) -> dict[int, str]:
  """{category id: name} of the config's dataset (its val annotation file when present), else COCO's."""
  if data_config.source == "coco":
    path = pathlib.Path(data_config.coco_dir) / data_config.val_annotations
    if path.is_file():
      return {int(c["id"]): str(c["name"]) for c in json.loads(path.read_text())["categories"]}
  return dict(categories.COCO_CATEGORIES)


def mechanism_pictures(outputs: dict, local: dict[str, np.ndarray]) -> dict[int, Image.Image]:
  """{image id: visualize.mechanism_picture} for the real images of a batch and the model's outputs on it."""
  pictures = {}
  for slot in np.flatnonzero((local["image_id"] >= 0) & (local["skipped"] == 0)):
    pictures[int(local["image_id"][slot])] = visualize.mechanism_picture(
      visualize.model_view(local, int(slot)), local["image"].shape[1:3], *visualize.token_maps(outputs, int(slot))
    )
  return pictures


def predict(
  model,
  variables: dict,
  paths: list[str],
  data_config: ml_collections.ConfigDict,
  batch_size: int,
  threshold: float,
  mechanism: bool = False,
) -> tuple[list[dict[str, Any]], dict[int, Image.Image]]:
  """(one entry per path: {'file', 'width', 'height', 'detections': [{'category_id', 'bbox' xywh, 'score'}]}
  ('error' instead of detections when the image cannot be decoded), {image id (1-based position):
  mechanism picture} when `mechanism`)."""
  source = sources.ImageFiles(paths)
  forward, detect = jax.jit(model.apply), jax.jit(postprocess.postprocess)  # one device: a few images
  found: dict[int, list] = {int(i): [] for i in source.image_ids}
  unreadable, pictures = set(), {}
  for local in pipeline.iterate(pipeline.eval_dataset(source, data_config, batch_size), 0):
    out = forward(variables, local["image"], local["padding_mask"])
    det = jax.tree.map(np.asarray, detect(out, local["orig_size"]))
    unreadable.update(int(i) for i in local["image_id"][local["skipped"] > 0])
    for d in evaluator.detections_to_coco(local["image_id"], det):
      if d["score"] >= threshold:
        found[d["image_id"]].append({k: d[k] for k in ("category_id", "bbox", "score")})
    if mechanism:
      pictures.update(mechanism_pictures(out, local))
  out = []
  for i, path in zip(source.image_ids, source.paths, strict=True):
    w, h = (int(v) for v in source.sizes[i - 1])
    entry = {"file": str(path), "width": w, "height": h}
    if int(i) in unreadable:
      entry["error"] = "cannot decode image"
    else:
      entry["detections"] = sorted(found[int(i)], key=lambda d: -d["score"])
    out.append(entry)
  return out, pictures


def write(
  results: list[dict[str, Any]], names: dict[int, str], out_dir: str, mechanism: dict[int, Image.Image] | None = None
) -> None:
  """OUT/detections.json (category names and picture paths added), OUT/<name>.png per readable image,
  and OUT/<name>_mechanism.png for the images in `mechanism` (keyed by 1-based position)."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  used: set[str] = set()
  for k, r in enumerate(results):
    if "error" in r:
      continue
    name = pathlib.Path(r["file"]).stem
    name = name if name not in used else f"{name}_{len(used)}"  # same file name in two folders
    used.add(name)
    r["picture"] = str(out / f"{name}.png")
    if mechanism and k + 1 in mechanism:
      r["mechanism_picture"] = str(out / f"{name}_mechanism.png")
      mechanism[k + 1].save(r["mechanism_picture"])
    for d in r["detections"]:
      d["category"] = names.get(d["category_id"], f"class {d['category_id']}")
    image = sources.ImageFiles([r["file"]]).image(0)
    xywh = np.array([d["bbox"] for d in r["detections"]], np.float32).reshape(-1, 4)
    picture = visualize.draw_detections(
      image,
      np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
      np.array([d["category_id"] for d in r["detections"]]),
      np.array([d["score"] for d in r["detections"]]),
      names,
    )
    picture.save(r["picture"])
  (out / "detections.json").write_text(json.dumps(results, indent=1))


def main(argv: list[str]) -> None:
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give one or more image files")
  if not (FLAGS.workdir or FLAGS.checkpoint):
    raise app.UsageError("give --workdir or --checkpoint")
  trainer.quiet_orbax_logs()
  cfg = FLAGS.config
  model, variables, _ = trainer.load_for_inference(cfg, FLAGS.workdir, FLAGS.checkpoint)
  results, pictures = predict(model, variables, paths, cfg.data, cfg.eval.batch_size, FLAGS.threshold, FLAGS.mechanism)
  write(results, category_names(cfg.data), FLAGS.out, pictures)
  for r in results:
    logging.info("%s: %s", r["file"], r.get("error") or f"{len(r['detections'])} detections")
  print(f"wrote {FLAGS.out}/detections.json and {sum('error' not in r for r in results)} pictures")


if __name__ == "__main__":
  app.run(main)
