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


def _to_rgb(img: Image.Image) -> np.ndarray:
  """uint8 (H, W, 3) RGB from any PIL mode: L, P, RGBA (alpha dropped), CMYK, 16/32-bit integer, float."""
  if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    a = np.asarray(img).astype(np.float64)  # (H, W)
    scale = 257.0 if img.mode != "I" or a.max(initial=0) > 255 else 1.0  # 16-bit range -> 8-bit
    a = np.clip(np.round(a / scale), 0, 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=-1)
  if img.mode == "F":
    a = np.asarray(img)
    top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
    a = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=-1)
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
  return _to_rgb(img)


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


class CocoSource:
  """A COCO-format detection directory: an image folder and an `instances_*.json` file."""

  def __init__(self, image_dir: str, annotation_file: str):
    self.image_dir = pathlib.Path(image_dir)
    self.annotation_file = pathlib.Path(annotation_file)
    if not self.annotation_file.is_file():
      raise FileNotFoundError(f"annotation file {self.annotation_file} does not exist")
    try:
      with open(self.annotation_file) as f:
        data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"annotation file {self.annotation_file} is not valid JSON: {e}") from e
    for key in ("images", "annotations", "categories"):
      if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"annotation file {self.annotation_file}: expected a list under '{key}' "
                         f"(COCO instances format)")
    self.skipped: dict[str, int] = {}
    self.categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    images = []
    for k, im in enumerate(data["images"]):
      missing = [f for f in ("id", "file_name", "width", "height") if f not in im]
      if missing:
        raise ValueError(f"annotation file {self.annotation_file}: images[{k}] lacks {missing}")
      if not (self.image_dir / im["file_name"]).is_file():
        self._skip("image file missing", f"{self.image_dir / im['file_name']}")
        continue
      images.append(im)
    self._images = sorted(images, key=lambda im: int(im["id"]))  # Canonical order, shared with TfdsSource.
    self.image_ids = np.array([int(im["id"]) for im in images], np.int64)
    self.sizes = np.array([(int(im["width"]), int(im["height"])) for im in images], np.int64).reshape(-1, 2)
    per_image: dict[int, list] = {int(i): [] for i in self.image_ids}
    for k, a in enumerate(data["annotations"]):
      bbox = a.get("bbox")
      if not (isinstance(bbox, list) and len(bbox) == 4 and "category_id" in a and "image_id" in a):
        self._skip("malformed annotation", f"annotations[{k}] in {self.annotation_file}")
        continue
      if int(a["image_id"]) in per_image:
        per_image[int(a["image_id"])].append((bbox, int(a["category_id"]), int(a.get("iscrowd", 0))))
    self._anns = [per_image[int(i)] for i in self.image_ids]
    self.annotation_category_ids = {c for anns in self._anns for _, c, _ in anns}
    self._json = data

  def coco_dataset(self) -> dict:
    """The annotation json as loaded (COCOeval's ground truth)."""
    return self._json

  def _skip(self, reason: str, what: str) -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    logging.warning("skipping %s: %s", what, reason)

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
    self.skipped: dict[str, int] = {}
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
