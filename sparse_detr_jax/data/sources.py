"""Random-access detection sources: a COCO-format directory (pycocotools) and a TFDS dataset.

Both expose the same interface, so everything downstream (transforms, buckets, loaders) is shared:
  len(source); source.sizes (N, 2) int (width, height) from the metadata; source.image_ids (N,);
  source.annotations(i) -> Annotations; source.image(i) -> uint8 (H, W, 3) RGB, or SampleError.
Annotations follow the official ConvertCocoPolysToMask: crowd objects removed, xywh -> xyxy, clipped
to the image, boxes with no area after clipping dropped. Labels are category ids (COCO's 91-id space).
"""
import dataclasses
import io
import json
import logging
import os
import pathlib
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sparse_detr_jax.data import categories

Image.MAX_IMAGE_PIXELS = None  # COCO-style datasets may hold large images; decoding is bounded by the file.


class SampleError(Exception):
  """One sample cannot be used (unreadable or inconsistent image); the loader skips it and counts it."""


@dataclasses.dataclass
class Annotations:
  boxes: np.ndarray   # (n, 4) float32 xyxy in pixels of the annotated image
  labels: np.ndarray  # (n,) int32 category ids


BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over (white, as image viewers show them)


def to_rgb(img: Image.Image) -> np.ndarray:
  """uint8 (H, W, 3) RGB from any PIL mode: 16-bit greys scaled to 8 bits (divided by 257, never clipped), 32-bit
  integer greys by their range (0..255 as is, 0..65535 as 16-bit; others refused with a ValueError), float greys
  by theirs ([0, 1] or [0, 255]); transparency (RGBA, LA, PA, or a palette's or grey's transparent colour)
  composited over white; every other mode (L, P, CMYK, YCbCr, LAB, HSV, 1) converted by PIL."""
  if img.mode.startswith("I;16") or img.mode == "I":
    a = np.asarray(img).astype(np.float64)  # (H, W)
    lo, hi = a.min(initial=0), a.max(initial=0)
    if lo < 0 or hi > 65535:
      raise ValueError(f"a {img.mode} image with values {lo:g}..{hi:g}: expected 8- or 16-bit intensities")
    scale = 1.0 if img.mode == "I" and hi <= 255 else 257.0  # 16-bit range -> 8-bit
    a = np.clip(np.round(a / scale), 0, 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=-1)
  if img.mode == "F":
    a = np.asarray(img)
    top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
    a = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=-1)
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
    rgba = img.convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB"))
  return np.asarray(img.convert("RGB"))


def decode_image(data: Union[bytes, str, os.PathLike], expected_wh: tuple[int, int], what: str,
                 upright: bool = False) -> np.ndarray:
  """Decode to uint8 (H, W, 3) RGB whose size is the annotated (width, height).

  COCO annotations refer to the stored pixels (the official loader ignores EXIF orientation); when
  the stored size differs from the annotated one but the EXIF-rotated size matches, the rotated image
  is used. `upright` always applies the EXIF orientation (unannotated photos). Any other mismatch, or
  an undecodable file, raises SampleError naming `what`.
  """
  try:
    if not isinstance(data, bytes):
      with open(data, "rb") as f:  # read whole: a file PIL fails to decode is still closed
        data = f.read()
    img = Image.open(io.BytesIO(data))
    img.load()
    if upright:
      img = ImageOps.exif_transpose(img)
  except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
    raise SampleError(f"{what}: cannot decode image ({type(e).__name__}: {e})") from e
  if img.size != tuple(expected_wh):
    rotated = ImageOps.exif_transpose(img)
    if rotated.size != tuple(expected_wh):
      raise SampleError(f"{what}: image is {img.size[0]}x{img.size[1]} (w x h) but the annotation says "
                        f"{expected_wh[0]}x{expected_wh[1]}")
    img = rotated
  try:
    return to_rgb(img)
  except ValueError as e:
    raise SampleError(f"{what}: {e}") from e


def clean_boxes(xywh: np.ndarray, labels: np.ndarray, crowd: np.ndarray, width: int, height: int
                ) -> Annotations:
  """Official ConvertCocoPolysToMask: drop crowd, xywh -> xyxy, clip, drop boxes without area."""
  keep = ~crowd.astype(bool)
  b = xywh[keep].astype(np.float32).reshape(-1, 4)
  b[:, 2:] += b[:, :2]
  b[:, 0::2] = np.clip(b[:, 0::2], 0, width)
  b[:, 1::2] = np.clip(b[:, 1::2], 0, height)
  ok = (b[:, 3] > b[:, 1]) & (b[:, 2] > b[:, 0])
  return Annotations(b[ok], labels[keep][ok].astype(np.int32))


def _is_int(x) -> bool:
  return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x)


class CocoSource:
  """A COCO-format detection directory: an image folder and an `instances_*.json` file.

  What the file cannot mean is an error naming the file, the entry and the field: a category without an integer
  `id` or a `name`, repeated category or image ids, an image without `id`, `file_name`, `width`, `height`, an
  annotation whose `category_id` is not among the categories. What one entry spoils is skipped, counted by reason
  in `skipped` and logged with the first few entries: an image whose file is missing (`skipped_images`), an
  annotation without a 4-number `bbox` or of an image id not in `images`, a box without area once clipped to its
  image (dropped as the official code drops it) (`skipped_annotations`). Crowd boxes are left out of training as
  in the official code and counted in `crowd_boxes` (COCOeval uses them).
  """

  IMAGE_REASONS = ("image file missing",)

  def __init__(self, image_dir: str, annotation_file: str):
    self.image_dir = pathlib.Path(image_dir)
    self.annotation_file = pathlib.Path(annotation_file)
    self.where = str(self.annotation_file)
    f = self.where
    if not self.annotation_file.is_file():
      raise FileNotFoundError(f"annotation file {f} does not exist")
    try:
      with open(self.annotation_file) as fh:
        data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"annotation file {f} is not valid JSON: {e}") from e
    for key in ("images", "annotations", "categories"):
      if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"annotation file {f}: expected a list under '{key}' (COCO instances format)")
    self.skipped: dict[str, int] = {}
    self._examples: dict[str, list[str]] = {}
    self.categories = categories.parse(data["categories"], f"annotation file {f}")
    images, seen = [], {}
    for k, im in enumerate(data["images"]):
      missing = [name for name in ("id", "file_name", "width", "height") if not isinstance(im, dict) or name not in im]
      if missing:
        raise ValueError(f"annotation file {f}: images[{k}] lacks {missing}")
      if not _is_int(im["id"]):
        raise ValueError(f"annotation file {f}: images[{k}] 'id' must be an integer, got {im['id']!r}")
      for name in ("width", "height"):
        if not _is_int(im[name]) or im[name] < 1:
          raise ValueError(f"annotation file {f}: images[{k}] (id {im['id']}) '{name}' must be a positive integer, "
                           f"got {im[name]!r}")
      if im["id"] in seen:
        raise ValueError(f"annotation file {f}: images[{seen[im['id']]}] and images[{k}] have the same id {im['id']}")
      seen[im["id"]] = k
      if not (self.image_dir / str(im["file_name"])).is_file():
        self._skip("image file missing", str(self.image_dir / str(im["file_name"])))
        continue
      images.append(im)
    self._images = sorted(images, key=lambda im: int(im["id"]))  # Canonical order, shared with TfdsSource.
    self.image_ids = np.array([int(im["id"]) for im in self._images], np.int64)
    self.sizes = np.array([(int(im["width"]), int(im["height"])) for im in self._images], np.int64).reshape(-1, 2)
    per_image: dict[int, list] = {int(i): [] for i in self.image_ids}
    self.crowd_boxes = self.area_from_box = 0
    ground_truth: list[dict] = []
    boxes: list[tuple] = []  # non-crowd boxes: (bbox, image width, image height, entry)
    for k, a in enumerate(data["annotations"]):
      what = f"annotations[{k}]" + (f" (id {a['id']})" if isinstance(a, dict) and "id" in a else "")
      if not isinstance(a, dict) or not all(name in a for name in ("bbox", "category_id", "image_id")):
        self._skip("annotation without bbox, category_id or image_id", what)
        continue
      if not _is_int(a["category_id"]) or a["category_id"] not in self.categories:
        raise ValueError(f"annotation file {f}: {what} has category_id {a['category_id']!r}, which is not in "
                         f"'categories' (ids {sorted(self.categories)})")
      bbox = a["bbox"]
      if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        self._skip("annotation whose bbox is not [x, y, width, height]", f"{what}: bbox {bbox!r}")
        continue
      if a["image_id"] not in seen:
        self._skip("annotation of an image id not in 'images'", f"{what}: image_id {a['image_id']!r}")
        continue
      if a["image_id"] not in per_image:  # its image file is missing: counted with the image
        continue
      crowd = bool(a.get("iscrowd", 0))
      self.crowd_boxes += crowd
      if not crowd:
        im = data["images"][seen[a["image_id"]]]
        boxes.append((bbox, im["width"], im["height"], what))
      per_image[a["image_id"]].append((bbox, int(a["category_id"]), int(crowd)))
      # COCOeval's ground truth: every well-formed annotation, in file order, numbered anew (pycocotools indexes
      # them by id), with the box's area where the file gives none (what COCOeval's area ranges read).
      self.area_from_box += "area" not in a
      ground_truth.append({**a, "id": len(ground_truth) + 1, "area": a.get("area", bbox[2] * bbox[3])})
    if boxes:  # the boxes clean_boxes drops (no area once clipped), counted here once
      xywh = np.array([b[0] for b in boxes], np.float32)  # float32, as clean_boxes computes
      wh = np.array([b[1:3] for b in boxes], np.float32)
      x0, y0 = np.clip(xywh[:, 0], 0, wh[:, 0]), np.clip(xywh[:, 1], 0, wh[:, 1])
      x1, y1 = np.clip(xywh[:, 0] + xywh[:, 2], 0, wh[:, 0]), np.clip(xywh[:, 1] + xywh[:, 3], 0, wh[:, 1])
      for k in np.flatnonzero(~((x1 > x0) & (y1 > y0))):
        bbox, w, h, what = boxes[k]
        self._skip("box without area inside its image (dropped, as the official code drops it)",
                   f"{what}: bbox {bbox} in a {w}x{h} image")
    self._anns = [per_image[int(i)] for i in self.image_ids]
    self.annotation_category_ids = {c for anns in self._anns for _, c, _ in anns}
    self._json = {"images": data["images"], "annotations": ground_truth, "categories": data["categories"]}
    if self.area_from_box:
      logging.info("%s: %d annotations without 'area': COCOeval's small/medium/large use their boxes' areas", f,
                   self.area_from_box)
    for reason, count in self.skipped.items():
      more = f" and {count - len(self._examples[reason])} more" if count > len(self._examples[reason]) else ""
      logging.warning("%s: %d skipped: %s (%s%s)", f, count, reason, "; ".join(self._examples[reason]), more)

  @property
  def skipped_images(self) -> int:
    return sum(n for r, n in self.skipped.items() if r in self.IMAGE_REASONS)

  @property
  def skipped_annotations(self) -> int:
    return sum(n for r, n in self.skipped.items() if r not in self.IMAGE_REASONS)

  def coco_dataset(self) -> dict:
    """COCOeval's ground truth: the annotation file's images and categories, its well-formed annotations."""
    return self._json

  def _skip(self, reason: str, what: str) -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    examples = self._examples.setdefault(reason, [])
    if len(examples) < 3:
      examples.append(what)

  def __len__(self) -> int:
    return len(self._images)

  def annotations(self, i: int) -> Annotations:
    rows = self._anns[i]
    xywh = np.array([r[0] for r in rows], np.float32).reshape(-1, 4)
    labels = np.array([r[1] for r in rows], np.int32)
    crowd = np.array([r[2] for r in rows], bool)
    w, h = self.sizes[i]
    return clean_boxes(xywh, labels, crowd, int(w), int(h))

  def image(self, i: int) -> np.ndarray:
    path = self.image_dir / self._images[i]["file_name"]
    if not path.is_file():
      raise SampleError(f"{path}: image file missing")
    return decode_image(path, tuple(self.sizes[i]), str(path))


class TfdsSource:
  """A TFDS detection dataset (features of `coco/2017`) read with `tfds.data_source` (array_record).

  Prepare COCO once with `tfds build coco/2017 --file_format=array_record` (TensorFlow needed for that
  build only), or any COCO-format directory with `python -m sparse_detr_jax.data.tfds_export`.
  Image sizes come from the encoded headers (the features carry none), read once at start-up.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # Only this source needs it.
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir,
                                  decoders={"image": tfds.decode.SkipDecoding()})
      names = tfds.builder(name, data_dir=data_dir).info.features["objects"]["label"].names
    except Exception as e:  # TFDS raises many types for a missing / unprepared dataset.
      raise FileNotFoundError(f"TFDS dataset {name!r} split {split!r} not readable in data_dir={data_dir}: "
                              f"{type(e).__name__}: {e}") from e
    self.where = f"TFDS dataset {name} split {split}"
    self.skipped: dict[str, int] = {}
    self.skipped_images = self.skipped_annotations = 0  # unreadable records are counted when loaded
    self._ids = np.array(categories.label_ids(list(names)), np.int32)
    self.categories = {int(i): n for i, n in zip(self._ids, names)}
    n = len(self._ds)
    ids, sizes = np.zeros(n, np.int64), np.ones((n, 2), np.int64)
    for i in range(n):  # Header reads only (PIL decodes lazily).
      rec = self._ds[i]
      ids[i] = int(rec.get("image/id", i))
      try:
        sizes[i] = Image.open(io.BytesIO(rec["image"])).size
      except (OSError, UnidentifiedImageError):
        pass  # Fails again, counted, when loaded.
    self._order = np.argsort(ids, kind="stable")  # Canonical order (by image id), shared with CocoSource.
    self.image_ids, self.sizes = ids[self._order], sizes[self._order]

  def __len__(self) -> int:
    return len(self._ds)

  def _record(self, i: int) -> dict:
    return self._ds[int(self._order[i])]

  def annotations(self, i: int) -> Annotations:
    obj = self._record(i)["objects"]
    w, h = (int(v) for v in self.sizes[i])
    yxyx = np.asarray(obj["bbox"], np.float32).reshape(-1, 4)  # normalised (ymin, xmin, ymax, xmax)
    xywh = np.stack([yxyx[:, 1] * w, yxyx[:, 0] * h, (yxyx[:, 3] - yxyx[:, 1]) * w,
                     (yxyx[:, 2] - yxyx[:, 0]) * h], -1)
    labels = self._ids[np.asarray(obj["label"], np.int64).reshape(-1)]
    crowd = np.asarray(obj.get("is_crowd", np.zeros(len(labels), bool)), bool).reshape(-1)
    return clean_boxes(xywh, labels, crowd, w, h)

  def image(self, i: int) -> np.ndarray:
    return decode_image(self._record(i)["image"], tuple(self.sizes[i]), f"TFDS record {i}")

  def coco_dataset(self) -> dict:
    """COCO-format ground truth rebuilt from the records (crowd objects included)."""
    images, anns = [], []
    for i in range(len(self)):
      w, h = (int(v) for v in self.sizes[i])
      images.append({"id": int(self.image_ids[i]), "width": w, "height": h})
      obj = self._record(i)["objects"]
      yxyx = np.asarray(obj["bbox"], np.float64).reshape(-1, 4) * [h, w, h, w]
      crowd = np.asarray(obj.get("is_crowd", np.zeros(len(yxyx), bool)), bool).reshape(-1)
      for b, lab, c in zip(yxyx, np.asarray(obj["label"]).reshape(-1), crowd):
        box = [float(b[1]), float(b[0]), float(b[3] - b[1]), float(b[2] - b[0])]
        anns.append({"id": len(anns) + 1, "image_id": int(self.image_ids[i]), "category_id": int(self._ids[lab]),
                     "bbox": box, "area": box[2] * box[3], "iscrowd": int(c)})
    cats = [{"id": int(k), "name": n} for k, n in self.categories.items()]
    return {"images": images, "annotations": anns, "categories": cats}


EXIF_ORIENTATION = 0x0112  # EXIF tag; values 5-8 rotate by 90 degrees (width and height swap)


class ImageFiles:
  """Unannotated image files in the source interface (prediction), upright by their EXIF orientation.

  Image ids are 1..N in the given order; a missing file is a FileNotFoundError, a file whose header cannot be read
  a ValueError naming it, or with `record_unreadable` an entry in `errors` (index -> message; its size 0 x 0).
  """

  def __init__(self, paths: list[str], record_unreadable: bool = False):
    self.paths = [pathlib.Path(p) for p in paths]
    self.errors: dict[int, str] = {}
    sizes = []
    for i, p in enumerate(self.paths):
      if not p.is_file():
        raise FileNotFoundError(f"{p}: no such image file")
      try:
        with Image.open(p) as img:
          w, h = img.size
          rotated = img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
      except (OSError, UnidentifiedImageError) as e:
        if not record_unreadable:
          raise ValueError(f"{p}: not a readable image ({e})") from e
        self.errors[i] = f"{p}: not a readable image ({type(e).__name__})"
        w = h = 0
        rotated = False
      sizes.append((h, w) if rotated else (w, h))
    self.sizes = np.array(sizes, np.int64).reshape(-1, 2)
    self.image_ids = np.arange(1, len(self.paths) + 1, dtype=np.int64)
    self.categories: dict[int, str] = {}

  def __len__(self) -> int:
    return len(self.paths)

  def annotations(self, i: int) -> Annotations:
    return Annotations(np.zeros((0, 4), np.float32), np.zeros(0, np.int32))

  def image(self, i: int) -> np.ndarray:
    return decode_image(self.paths[i], tuple(self.sizes[i]), str(self.paths[i]), upright=True)


class ArrayImages:
  """Images a program holds, (H, W, 3) uint8 RGB arrays, in the source interface (Detector); ids 1..N."""

  def __init__(self, images: list[np.ndarray]):
    self.images = images
    self.sizes = np.array([(a.shape[1], a.shape[0]) for a in images], np.int64).reshape(-1, 2)
    self.image_ids = np.arange(1, len(images) + 1, dtype=np.int64)
    self.categories: dict[int, str] = {}

  def __len__(self) -> int:
    return len(self.images)

  def annotations(self, i: int) -> Annotations:
    return Annotations(np.zeros((0, 4), np.float32), np.zeros(0, np.int32))

  def image(self, i: int) -> np.ndarray:
    return self.images[i]


def check_classes(source, num_classes: int) -> None:
  """Raise ValueError, naming the largest category id, when a source has ids the class heads cannot predict
  (`model.num_classes` logits: ids 0 .. num_classes - 1); they would train silently into a useless model."""
  ids = set(source.categories) | set(getattr(source, "annotation_category_ids", ()))
  if ids and max(ids) >= num_classes:
    where = getattr(source, "annotation_file", None) or "the dataset"
    raise ValueError(
      f"{where}: category id {max(ids)} >= model.num_classes = {num_classes}: set "
      f"--config.model.num_classes={max(ids) + 1} (ids are used as class indices, as in the official code)"
    )


def build_source(data_config, split: str):
  """The source a config's `data` block names, for split 'train' or 'val'."""
  d = data_config
  if d.source == "coco":
    root = pathlib.Path(d.coco_dir)
    return CocoSource(root / d[f"{split}_images"], root / d[f"{split}_annotations"])
  if d.source == "tfds":
    return TfdsSource(d.tfds_name, d[f"tfds_{split}_split"], d.get("tfds_data_dir"))
  raise ValueError(f"config data.source must be 'coco' or 'tfds', got {d.source!r}")
