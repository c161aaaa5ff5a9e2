"""Pictures: detections drawn on an image (predict.py, the demo)."""
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw

PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128))  # one colour per category id mod 10


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    names: Mapping[int, str]) -> Image.Image:
  """image (H, W, 3) uint8; boxes (n, 4) xyxy pixels; labels (n,); scores (n,) -> RGB picture."""
  img = Image.fromarray(image).convert("RGB")
  draw = ImageDraw.Draw(img)
  width = max(1, round(max(img.size) / 300))
  for k in np.argsort(scores, kind="stable"):  # the best detection drawn last, on top
    (x0, y0, x1, y1), label, score = boxes[k], labels[k], scores[k]
    colour = PALETTE[int(label) % len(PALETTE)]
    draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
    text = f"{names.get(int(label), f'class {int(label)}')} {score:.2f}"
    tx, ty = x0, max(0, y0 - 11)
    draw.rectangle(draw.textbbox((tx, ty), text), fill=colour)
    draw.text((tx, ty), text, fill=(0, 0, 0))
  return img
