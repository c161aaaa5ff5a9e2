"""Pictures: detections drawn on an image (predict.py, the demo) and Sparse DETR's mechanism (kept
encoder tokens and decoder attention map per feature level; Detector.mechanism, TensorBoard).

Text is sized to the picture (TITLE_SHARE of its height) so that pictures read without zooming. The pictures
need numpy and PIL only (an ONNX detector's machine has no JAX); the two functions that run the model
(`token_maps`, `batch_pictures`) import JAX when called.
"""

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sparse_detr_jax.data import transforms

TITLE_SHARE = 0.02  # text height / picture height
MIN_TEXT_PX = 11
MIN_TILE_SIDE = 320  # mechanism tiles of smaller images are enlarged by an integer factor
MAX_PICTURE_SIDE = 2000  # the mechanism picture's long side, by default
KEPT_RGB = (255, 255, 0)
PALETTE = (
  (230, 25, 75),
  (60, 180, 75),
  (255, 225, 25),
  (0, 130, 200),
  (245, 130, 48),
  (145, 30, 180),
  (70, 240, 240),
  (240, 50, 230),
  (210, 245, 60),
  (0, 128, 128),
)  # one colour per category id mod 10


def font(picture_height: int) -> ImageFont.FreeTypeFont:
  """Pillow's bundled font at TITLE_SHARE of the picture height (at least MIN_TEXT_PX)."""
  return ImageFont.load_default(size=max(MIN_TEXT_PX, round(TITLE_SHARE * picture_height)))


def draw_detections(
  image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, names: Mapping[int, str]
) -> Image.Image:
  """image (H, W, 3) uint8; boxes (n, 4) xyxy pixels; labels (n,); scores (n,) -> RGB picture. Every box is drawn;
  labels ("name 0.87") best first where they do not cover a label already drawn (`label_places`)."""
  img = Image.fromarray(image).convert("RGB")
  draw = ImageDraw.Draw(img)
  width = max(1, round(max(img.size) / 300))
  text_font = font(img.height)
  order = np.argsort(scores, kind="stable")  # the best box drawn last, on top
  for k in order:
    draw.rectangle(list(boxes[k]), outline=PALETTE[int(labels[k]) % len(PALETTE)], width=width)
  texts = [f"{names.get(int(c), f'class {int(c)}')} {s:.2f}" for c, s in zip(labels, scores, strict=True)]
  sizes = [draw.textbbox((0, 0), t, font=text_font)[2:] for t in texts]
  for k, (x0, y0, x1, y1) in label_places(boxes, sizes, scores, img.size):
    draw.rectangle((x0, y0, x1, y1), fill=PALETTE[int(labels[k]) % len(PALETTE)])
    draw.text((x0, y0), texts[k], fill=(0, 0, 0), font=text_font)
  return img


def label_places(
  boxes: np.ndarray, sizes: Sequence[tuple[int, int]], scores: np.ndarray, picture: tuple[int, int]
) -> list[tuple[int, tuple[int, int, int, int]]]:
  """Where labels go: (detection index, label rectangle x0, y0, x1, y1), best score first. A label of size
  sizes[k] = (w, h) sits on its box's top-left corner, above the box where there is room, moved inside the picture
  (width, height); one that would overlap a label already placed is left out, so crowded or small pictures keep
  readable labels for their best detections."""
  width, height = picture
  placed: list[tuple[int, tuple[int, int, int, int]]] = []
  for k in np.argsort(-np.asarray(scores), kind="stable"):
    w, h = (int(v) for v in sizes[k])
    x0 = int(min(max(0, boxes[k][0]), max(0, width - w)))
    y0 = int(max(0, boxes[k][1] - h))
    rect = (x0, y0, x0 + w, y0 + h)
    if all(rect[2] <= r[0] or r[2] <= rect[0] or rect[3] <= r[1] or r[3] <= rect[1] for _, r in placed):
      placed.append((int(k), rect))
  return placed


def token_maps(outputs: dict) -> tuple["jax.Array", "jax.Array"]:  # noqa: F821
  """Sparse DETR's mechanism over the flat token grid, jittable: (kept (B, N) bool, attention (B, N) float32).

  Kept: the tokens the encoder updated (each image's top-rho slots; every unpadded token when rho = 0).
  Attention: the decoder attention map (dam.attention_map), what the scoring network learns to predict.
  """
  shapes = [tuple(int(v) for v in s) for s in np.asarray(outputs["spatial_shapes"])]
  # Model code, imported here only: pictures of an exported detector's outputs never load it.
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from sparse_detr_jax import dam  # pylint: disable=import-outside-toplevel

  attention = dam.attention_map(shapes, outputs["sampling_locations_dec"], outputs["attn_weights_dec"])
  if "backbone_topk_proposals" not in outputs:
    return ~outputs["mask_flatten"], attention
  n = attention.shape[1]
  scatter = lambda i, v: jnp.zeros((n,), jnp.int32).at[i].max(v.astype(jnp.int32))
  kept = jax.vmap(scatter)(outputs["backbone_topk_proposals"], outputs["kept_slot_mask"]) > 0  # (B, N)
  return kept, attention


def level_grids(flat: np.ndarray, shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
  """A flat token map (N,) -> one (h_l, w_l) grid per feature level."""
  starts = np.concatenate([[0], np.cumsum([h * w for h, w in shapes])])
  return [np.asarray(flat[starts[l] : starts[l + 1]]).reshape(h, w) for l, (h, w) in enumerate(shapes)]


def _heat(values: np.ndarray) -> np.ndarray:
  """float array -> uint8 black-red-yellow-white heat colours (..., 3), scaled to the array's maximum."""
  t = values / max(float(values.max()), 1e-12)
  rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], -1)
  return (rgb * 255).astype(np.uint8)


def _overlay(image: Image.Image, grid: np.ndarray, canvas: tuple[int, int], alpha: float) -> Image.Image:
  """Blend a token grid (h_l, w_l, 3) spanning the padded canvas (w, h pixels) over the image it starts with."""
  layer = Image.fromarray(grid).resize(canvas, Image.NEAREST).crop((0, 0) + image.size)
  return Image.blend(image, layer, alpha)


def mechanism_tiles(
  image: np.ndarray,
  canvas_hw: tuple[int, int],
  kept: list[np.ndarray],
  attention: list[np.ndarray],
  max_width: int,
  max_height: int,
) -> list[tuple[Image.Image, Image.Image, str]]:
  """Per feature level: (kept tokens in yellow over the image, decoder attention heat over it, title), tiles
  at the image's aspect ratio, the levels side by side at most `max_width` wide, two rows at most
  `max_height` high."""
  h, w = image.shape[:2]
  zoom = max(1, MIN_TILE_SIDE // max(h, w))  # small CPU-demo images, enlarged for reading
  scale = zoom * min(1.0, max_width / (len(kept) * w * zoom), max_height / (2 * h * zoom))
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  base = Image.fromarray(image).convert("RGB").resize(size, Image.BILINEAR if scale < 1 else Image.NEAREST)
  canvas = (round(canvas_hw[1] * scale), round(canvas_hw[0] * scale))
  tiles = []
  for lvl, (k, a) in enumerate(zip(kept, attention, strict=True)):
    on_image = -(-h * k.shape[0] // canvas_hw[0]) * -(-w * k.shape[1] // canvas_hw[1])
    keep_rgb = np.where(k[..., None], np.array(KEPT_RGB, np.uint8), np.zeros(3, np.uint8))
    title = f"level {lvl}: {int(k.sum())}/{on_image} kept"
    tiles.append((_overlay(base, keep_rgb, canvas, 0.55), _overlay(base, _heat(a), canvas, 0.7), title))
  return tiles


def mechanism_picture(
  image: np.ndarray,
  canvas_hw: tuple[int, int],
  kept: list[np.ndarray],
  attention: list[np.ndarray],
  max_side: int = MAX_PICTURE_SIDE,
) -> Image.Image:
  """Sparse DETR's mechanism for one image, as the paper's figures: feature levels side by side (columns),
  the tokens the scoring network kept (top row, yellow) and the decoder attention map (bottom row, heat,
  each level scaled to its maximum), titles and a legend; long side at most about `max_side` pixels.

  image: (h, w, 3) uint8, the image as the model saw it (resized, unpadded; model_view); canvas_hw: the
  padded canvas it sat in; kept / attention: per-level grids (level_grids of token_maps).
  """
  gap = max(4, max_side // 400)
  # Three text lines take ~3 * 1.5 * TITLE_SHARE of the height.
  tiles = mechanism_tiles(image, canvas_hw, kept, attention, max_side - (len(kept) - 1) * gap, round(0.85 * max_side))
  tw, th = tiles[0][0].size
  text = font(round((2 * th + 3 * gap) / (1 - 3 * TITLE_SHARE)))  # three text lines of ~2% of the height
  line = text.getbbox("Ag")[3] + gap
  width = len(tiles) * (tw + gap) - gap
  picture = Image.new("RGB", (width, 2 * th + 3 * line), "white")
  draw = ImageDraw.Draw(picture)
  for col, (top, bottom, title) in enumerate(tiles):
    x = col * (tw + gap)
    draw.text((x, 0), title, fill=(0, 0, 0), font=text)
    picture.paste(top, (x, line))
    draw.text((x, line + th + gap // 2), "decoder attention", fill=(0, 0, 0), font=text)
    picture.paste(bottom, (x, 2 * line + th))
  _legend(draw, 2 * line + 2 * th + gap // 2, line, text)
  return picture


def _legend(draw: ImageDraw.ImageDraw, y: int, line: int, text: ImageFont.FreeTypeFont) -> None:
  """One line at height y: a yellow swatch 'kept token', then the heat colour bar from 0 to the level's maximum."""
  s, ink = line * 2 // 3, (0, 0, 0)
  draw.rectangle((0, y, s, y + s), fill=KEPT_RGB, outline=ink)
  x = s + s // 2
  for label, bar in (("kept token", 0), ("decoder attention: 0", 12 * s), ("level maximum", 0)):
    draw.text((x, y), label, fill=ink, font=text)
    x += round(draw.textlength(label, font=text)) + s // 2
    for i, c in enumerate(_heat(np.linspace(0, 1, bar)) if bar else []):
      draw.line((x + i, y, x + i, y + s), fill=tuple(int(v) for v in c))
    x += bar + (s // 2 if bar else 2 * s)


def model_view(batch: dict[str, np.ndarray], slot: int) -> np.ndarray:
  """The image in `slot` of a pipeline batch as the model saw it (resized, unpadded): (h, w, 3) uint8."""
  h, w = (int(v) for v in batch["size"][slot])
  return transforms.denormalize(batch["image"][slot, :h, :w])


def batch_pictures(
  model, variables: dict, batch: dict[str, np.ndarray], names: Mapping[int, str], threshold: float = 0.3
) -> dict[str, np.ndarray]:
  """{'detections', 'mechanism'}: (H, W, 3) uint8 pictures of a batch's first image (a pipeline batch:
  image, padding_mask, size, orig_size), for TensorBoard. `variables` on one device."""
  import jax  # pylint: disable=import-outside-toplevel

  from sparse_detr_jax import postprocess  # pylint: disable=import-outside-toplevel

  out = jax.jit(model.apply)(variables, batch["image"][:1], batch["padding_mask"][:1])
  h, w = (int(v) for v in batch["size"][0])
  seen = model_view(batch, 0)
  det = jax.tree.map(np.asarray, postprocess.postprocess(out, np.array([[h, w]], np.int32)))
  keep = det["scores"][0] >= threshold
  detections = draw_detections(seen, det["boxes"][0][keep], det["labels"][0][keep], det["scores"][0][keep], names)
  shapes = np.asarray(out["spatial_shapes"])
  kept, attention = (level_grids(np.asarray(m[0]), shapes) for m in token_maps(out))
  mechanism = mechanism_picture(seen, batch["image"].shape[1:3], kept, attention)
  return {"detections": np.asarray(detections), "mechanism": np.asarray(mechanism)}
