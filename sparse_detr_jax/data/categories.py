"""Label maps: the category ids a model predicts and their names.

A run owns its label map: train.py writes the training dataset's categories to WORKDIR/labels.json before the
first step, `convert` writes COCO's beside a converted official model, and exports carry theirs in the manifest.
Everything that names detections (evaluate, predict, `Detector`) reads it from the checkpoint, whatever the
working directory. The file is COCO's own `categories` list, so a COCO annotation file is a label file too:

    {"categories": [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}]}
"""

import json
import logging
import os
import pathlib

LABELS_FILE = "labels.json"
COCO_NUM_CLASSES = 91  # the official class heads: COCO's category ids 1..90 plus the unused 0

COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


def label_ids(names: list[str]) -> list[int]:
  """Category ids for a TFDS ClassLabel's names: COCO's ids when every name is a COCO name, else 1..K."""
  by_name = {n: i for i, n in COCO_CATEGORIES.items()}
  norm = [n.replace("_", " ") for n in names]
  if all(n in by_name for n in norm):
    return [by_name[n] for n in norm]
  return list(range(1, len(names) + 1))


def parse(categories: object, where: str) -> dict[int, str]:
  """{id: name} of a COCO `categories` list; a ValueError naming `where`, the entry and the field otherwise."""
  if not isinstance(categories, list):
    raise ValueError(f"{where}: expected a list under 'categories' ([{{'id': 1, 'name': 'cat'}}, ...])")
  names: dict[int, str] = {}
  for k, c in enumerate(categories):
    if not isinstance(c, dict):
      raise ValueError(f"{where}: categories[{k}] is not an object with 'id' and 'name'")
    for field in ("id", "name"):
      if field not in c:
        raise ValueError(f"{where}: categories[{k}] lacks '{field}' (every category needs an 'id' and a 'name')")
    cid = c["id"]
    if isinstance(cid, bool) or not isinstance(cid, int) or cid < 0:
      raise ValueError(f"{where}: categories[{k}] 'id' must be a non-negative integer, got {cid!r}")
    if not isinstance(c["name"], str) or not c["name"].strip():
      raise ValueError(f"{where}: categories[{k}] (id {cid}) 'name' must be a non-empty string, got {c['name']!r}")
    if cid in names:
      raise ValueError(f"{where}: categories[{k}] repeats id {cid} ({names[cid]!r} and {c['name']!r})")
    names[cid] = c["name"]
  return names


def as_json(names: dict[int, str]) -> str:
  return json.dumps({"categories": [{"id": int(i), "name": n} for i, n in sorted(names.items())]}, indent=1)


def write(directory: str | os.PathLike, names: dict[int, str]) -> None:
  """DIRECTORY/labels.json (atomically: other hosts may be reading it)."""
  path = pathlib.Path(directory) / LABELS_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{LABELS_FILE}.tmp")
  tmp.write_text(as_json(names))
  os.replace(tmp, path)


def read_file(path: str | os.PathLike) -> dict[int, str]:
  """The label map of a labels.json or of a COCO annotation file (its `categories`)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such label file (expected {LABELS_FILE} or a COCO annotation file)")
  try:
    data = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a JSON label file ({e})") from None
  if not isinstance(data, dict) or "categories" not in data:
    raise ValueError(f"{path}: expected an object with 'categories' ({LABELS_FILE} or a COCO annotation file)")
  return parse(data["categories"], str(path))


def read(directory: str | os.PathLike) -> dict[int, str] | None:
  """DIRECTORY/labels.json's label map, or None where there is none."""
  path = pathlib.Path(directory) / LABELS_FILE
  return read_file(path) if path.is_file() else None


def for_official(num_classes: int) -> dict[int, str] | None:
  """An official checkpoint's label map: COCO's for the official 91 class logits, else unknown (None)."""
  return dict(COCO_CATEGORIES) if num_classes == COCO_NUM_CLASSES else None


def warn_unknown(where: str) -> None:
  logging.warning(
    "%s: no label map (%s), so the category names are unknown: detections are named 'class N' by id "
    "(give the names with a label file: predict --labels FILE, Detector.from_checkpoint(..., labels=FILE))",
    where,
    LABELS_FILE,
  )
