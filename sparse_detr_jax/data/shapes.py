"""A generated detection dataset of coloured shapes, written as a COCO-format directory.

    python -m sparse_detr_jax.data.shapes OUT_DIR --train N --val M [--seed S]

writes OUT_DIR/train/*.jpg, OUT_DIR/val/*.jpg and OUT_DIR/annotations/instances_{train,val}.json.
Classes are shape x colour (CATEGORIES); images vary in size and aspect ratio (landscape, portrait,
square), carry 1-4 objects of varied sizes that may overlap, on noisy backgrounds. The same seed
gives the same files. It is read through the ordinary COCO-directory source.
"""
import argparse
import json
import pathlib

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220)}
CATEGORIES = [{"id": 1 + k, "name": f"{c} {s}", "supercategory": "shape"}
              for k, (c, s) in enumerate((c, s) for c in COLOURS for s in SHAPES)]
ASPECTS = ((4, 3), (3, 4), (1, 1), (16, 9), (9, 16))  # (w, h) ratios, COCO-like mix


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
  inter = np.prod(np.clip(rb - lt, 0, None))
  return float(inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter))


def draw_image(rng: np.random.Generator, long_side: tuple[int, int] = (160, 256)
               ) -> tuple[Image.Image, list[tuple[int, list[float]]]]:
  """One image and its objects [(category_id, [x, y, w, h])]."""
  aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
  side = int(rng.integers(long_side[0], long_side[1] + 1))
  w, h = (side, max(32, side * ah // aw)) if aw >= ah else (max(32, side * aw // ah), side)
  base = rng.integers(90, 200, size=3)
  noise = rng.normal(0, 18, size=(h, w, 3))
  ramp = np.linspace(-20, 20, w)[None, :, None] * rng.choice([-1, 1])
  img = Image.fromarray(np.clip(base + noise + ramp, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  objects, placed = [], []
  for _ in range(int(rng.integers(1, 5))):
    for _attempt in range(20):
      s = int(rng.uniform(0.18, 0.5) * min(w, h))
      x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
      box = np.array([x0, y0, x0 + s, y0 + s], np.float64)
      if all(_iou(box, p) < 0.3 for p in placed):
        break
    else:
      continue
    placed.append(box)
    k = int(rng.integers(len(CATEGORIES)))
    colour_name, shape = CATEGORIES[k]["name"].split()
    colour = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[colour_name])
    x1, y1 = x0 + s - 1, y0 + s - 1
    if shape == "circle":
      draw.ellipse([x0, y0, x1, y1], fill=colour)
    elif shape == "square":
      draw.rectangle([x0, y0, x1, y1], fill=colour)
    else:
      draw.polygon([(x0 + s / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    objects.append((CATEGORIES[k]["id"], [float(x0), float(y0), float(s), float(s)]))
  return img, objects


def write_split(out: pathlib.Path, split: str, n: int, rng: np.random.Generator, first_id: int) -> None:
  (out / split).mkdir(parents=True, exist_ok=True)
  images, annotations = [], []
  for k in range(n):
    img, objects = draw_image(rng)
    image_id = first_id + k
    name = f"{image_id:08d}.jpg"
    img.save(out / split / name, quality=95)
    images.append({"id": image_id, "file_name": name, "width": img.width, "height": img.height})
    for cat, bbox in objects:
      annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat, "bbox": bbox,
                          "area": bbox[2] * bbox[3], "iscrowd": 0})
  (out / "annotations").mkdir(parents=True, exist_ok=True)
  with open(out / "annotations" / f"instances_{split}.json", "w") as f:
    json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)


def generate(out_dir: str, num_train: int, num_val: int, seed: int = 0) -> None:
  """Write the dataset; deterministic in `seed` (train and val use independent streams)."""
  out = pathlib.Path(out_dir)
  write_split(out, "train", num_train, np.random.default_rng([seed, 0]), 1)
  write_split(out, "val", num_val, np.random.default_rng([seed, 1]), 1_000_001)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("out_dir")
  p.add_argument("--train", type=int, required=True, help="number of training images")
  p.add_argument("--val", type=int, required=True, help="number of validation images")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  generate(a.out_dir, a.train, a.val, a.seed)
  print(f"wrote {a.train} train and {a.val} val images to {a.out_dir}")


if __name__ == "__main__":
  main()
