"""COCO's 80 detection categories in the 91-id space the official code predicts in (num_classes=91)."""

import json
import pathlib

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


def names_for(data_config) -> dict[int, str]:
  """{category id: name} of a config's dataset: its val annotation file's categories when present, else COCO's."""
  if data_config.source == "coco":
    path = pathlib.Path(data_config.coco_dir) / data_config.val_annotations
    if path.is_file():
      return {int(c["id"]): str(c["name"]) for c in json.loads(path.read_text())["categories"]}
  return dict(COCO_CATEGORIES)
