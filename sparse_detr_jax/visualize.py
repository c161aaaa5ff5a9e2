"""Pictures: detections drawn on an image (predict.py, the demo) and Sparse DETR's mechanism (kept
encoder tokens and decoder attention map per feature level; predict.py --mechanism, TensorBoard)."""

from collections.abc import Mapping

import jax
import numpy as np
from PIL import Image, ImageDraw

from sparse_detr_jax import dam, postprocess
from sparse_detr_jax.data import transforms

MIN_PICTURE_SIDE = 320  # mechanism pictures of smaller images are enlarged by an integer factor
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


def draw_detections(
  image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, names: Mapping[int, str]
) -> Image.Image:
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


def token_maps(outputs: dict, index: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Image `index`'s kept-token masks and DAM per feature level over the padded canvas:
  ([(h_l, w_l) bool], [(h_l, w_l) float]).

  outputs: the model's (batch) outputs. Kept tokens: its first `sparse_token_nums` top-rho slots (every
  unpadded token when rho = 0); DAM: decoder sampling weights splatted on the token grid (dam.attention_map).
  """
  shapes = [tuple(int(v) for v in s) for s in np.asarray(outputs["spatial_shapes"])]
  attn = np.asarray(
    dam.attention_map(
      shapes, outputs["sampling_locations_dec"][index : index + 1], outputs["attn_weights_dec"][index : index + 1]
    )[0]
  )
  if "backbone_topk_proposals" in outputs:
    kept = np.zeros(attn.shape[0], bool)
    kept[np.asarray(outputs["backbone_topk_proposals"][index])[: int(outputs["sparse_token_nums"][index])]] = True
  else:
    kept = ~np.asarray(outputs["mask_flatten"][index])
  starts = np.concatenate([[0], np.cumsum([h * w for h, w in shapes])])
  grids = lambda x: [x[starts[l] : starts[l + 1]].reshape(h, w) for l, (h, w) in enumerate(shapes)]
  return grids(kept), grids(attn)


def _heat(values: np.ndarray) -> np.ndarray:
  """(h, w) float -> (h, w, 3) uint8 black-red-yellow-white heat colours, scaled to the map's maximum."""
  t = values / max(float(values.max()), 1e-12)
  rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], -1)
  return (rgb * 255).astype(np.uint8)


def _overlay(image: Image.Image, grid: np.ndarray, canvas: tuple[int, int], alpha: float) -> Image.Image:
  """Blend a token grid (h_l, w_l, 3) spanning the padded canvas (w, h pixels) over the image it starts with."""
  layer = Image.fromarray(grid).resize(canvas, Image.NEAREST).crop((0, 0) + image.size)
  return Image.blend(image, layer, alpha)


def mechanism_picture(
  image: np.ndarray, canvas_hw: tuple[int, int], kept: list[np.ndarray], attention: list[np.ndarray]
) -> Image.Image:
  """Sparse DETR's mechanism for one image, as the paper's figures: per feature level (columns), the
  tokens the scoring network kept (top row, yellow) and the decoder attention map (bottom row, heat).

  image: (h, w, 3) uint8, the image as the model saw it (resized, unpadded; model_view); canvas_hw: the
  padded canvas it sat in; kept / attention: token_maps() of that image.
  """
  base = Image.fromarray(image).convert("RGB")
  zoom = max(1, MIN_PICTURE_SIDE // max(base.size))  # small CPU-demo images, enlarged for reading
  base = base.resize((base.width * zoom, base.height * zoom), Image.NEAREST)
  canvas = (canvas_hw[1] * zoom, canvas_hw[0] * zoom)
  tiles = []
  for k, a in zip(kept, attention, strict=True):
    on_image = -(-image.shape[0] * k.shape[0] // canvas_hw[0]) * -(-image.shape[1] * k.shape[1] // canvas_hw[1])
    keep_rgb = np.where(k[..., None], np.array([255, 255, 0], np.uint8), np.array([0, 0, 0], np.uint8))
    tiles.append(
      (
        _overlay(base, keep_rgb, canvas, 0.55),
        _overlay(base, _heat(a), canvas, 0.7),
        f"level {len(tiles)}: {int(k.sum())}/{on_image} kept",
      )
    )
  w, h = base.size
  pad = 14
  picture = Image.new("RGB", (len(tiles) * (w + 4), 2 * (h + pad)), "white")
  draw = ImageDraw.Draw(picture)
  for col, (top, bottom, title) in enumerate(tiles):
    x = col * (w + 4)
    draw.text((x + 2, 1), title, fill=(0, 0, 0))
    picture.paste(top, (x, pad))
    draw.text((x + 2, h + pad + 1), "decoder attention (DAM)", fill=(0, 0, 0))
    picture.paste(bottom, (x, h + 2 * pad))
  return picture


def model_view(batch: dict[str, np.ndarray], slot: int) -> np.ndarray:
  """The image in `slot` of a pipeline batch as the model saw it (resized, unpadded): (h, w, 3) uint8."""
  h, w = (int(v) for v in batch["size"][slot])
  return transforms.denormalize(batch["image"][slot, :h, :w])


def batch_pictures(
  model, variables: dict, batch: dict[str, np.ndarray], names: Mapping[int, str], threshold: float = 0.3
) -> dict[str, np.ndarray]:
  """{'detections', 'mechanism'}: (H, W, 3) uint8 pictures of a batch's first image (a pipeline batch:
  image, padding_mask, size, orig_size), for TensorBoard. `variables` on one device."""
  out = jax.jit(model.apply)(variables, batch["image"][:1], batch["padding_mask"][:1])
  h, w = (int(v) for v in batch["size"][0])
  seen = model_view(batch, 0)
  det = jax.tree.map(np.asarray, postprocess.postprocess(out, np.array([[h, w]], np.int32)))
  keep = det["scores"][0] >= threshold
  detections = draw_detections(seen, det["boxes"][0][keep], det["labels"][0][keep], det["scores"][0][keep], names)
  mechanism = mechanism_picture(seen, batch["image"].shape[1:3], *token_maps(out, 0))
  return {"detections": np.asarray(detections), "mechanism": np.asarray(mechanism)}
