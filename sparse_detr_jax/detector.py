"""Detector: Sparse DETR on images a program holds, in one object that owns the preprocessing (the
official evaluation transform), the batching into the config's static canvases and one compiled function
per canvas, reused across calls.

    from sparse_detr_jax import Detector
    detector = Detector.from_checkpoint("sparse_detr_r50_10.pth")   # or a training run, or an export
    detections = detector(image)          # (H, W, 3) uint8 RGB array or PIL image; a list gives a list
    detector.draw(image, detections).save("detections.png")
    detector.mechanism(image).save("mechanism.png")   # kept encoder tokens and decoder attention per level

Boxes are [x0, y0, x1, y1] in the image's pixels, clipped to it (evaluate.py keeps the official
unclipped boxes for COCO parity). In-process models and jax.export exports run with JAX on the first local
device; ONNX exports (`from_onnx`) with ONNX Runtime. This module itself (reading images, batching them into
canvases, reading the detections off the function's outputs, drawing) needs numpy and PIL only: JAX is imported
by the constructors that need it, so that an ONNX detector runs on a machine without JAX.
"""

import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from sparse_detr_jax import visualize
from sparse_detr_jax.data import categories, pipeline, sources

if TYPE_CHECKING:
  import ml_collections

ImageLike = np.ndarray | Image.Image | str | os.PathLike
Detection = dict[str, Any]  # {'box': [x0, y0, x1, y1], 'score', 'category_id', 'category'}
# The inference function (`inference_function`): (variables, image, padding_mask, orig_size) -> OUTPUTS.
InferFn = Callable[..., dict[str, Any]]
OUTPUTS = ("scores", "labels", "boxes", "kept", "attention", "spatial_shapes")
# A compiled inference function by canvas: runner(canvas, image, padding_mask, orig_size) -> {OUTPUTS: arrays}.
Runner = Callable[[tuple[int, int], np.ndarray, np.ndarray, np.ndarray], dict[str, Any]]
# What `python -m sparse_detr_jax.export` writes: DIR/manifest.json and one file per canvas.
MANIFEST = "manifest.json"
VARIABLES = "variables.npz"  # the jax.export format's weights
FORMATS = {"jax": "sparse_detr_jax.export/1", "onnx": "sparse_detr_jax.onnx/1"}


def inference_function(model, class_ids: Sequence[int] | None = None) -> InferFn:
  """What a Detector compiles and `export` serializes, per canvas (H, W):
  (variables, image (B, H, W, 3) normalised float32, padding_mask (B, H, W) bool, orig_size (B, 2) int32 (h, w))
  -> {scores (B, D), labels (B, D), boxes (B, D, 4) xyxy pixels of orig_size, unclipped (official
  post-processing over the classes `class_ids`, the model's label map: all if None; D = 100); kept (B, N) bool,
  attention (B, N) float32 (visualize.token_maps); spatial_shapes (L, 2) int32}."""

  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from sparse_detr_jax import postprocess  # pylint: disable=import-outside-toplevel

  def infer(variables: dict, image, padding_mask, orig_size) -> dict[str, Any]:
    out = model.apply(variables, image, padding_mask)
    kept, attention = visualize.token_maps(out)
    shapes = jnp.asarray(out["spatial_shapes"], jnp.int32)
    detections = postprocess.postprocess(out, orig_size, class_ids=class_ids)
    return {**detections, "kept": kept, "attention": attention, "spatial_shapes": shapes}

  return infer


def input_specs(batch_size: Any, canvas: tuple[int, int]) -> tuple:
  """The inference function's inputs after the variables, at a batch size (an int, or jax.export's symbolic
  dimension) and canvas (H, W): image (B, H, W, 3) float32, padding_mask (B, H, W) bool, orig_size (B, 2) int32."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  b, (h, w) = batch_size, canvas
  return (
    jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32),
    jax.ShapeDtypeStruct((b, h, w), jnp.bool_),
    jax.ShapeDtypeStruct((b, 2), jnp.int32),
  )


def as_image(image: Any, name: str) -> np.ndarray:
  """An image file's path, a PIL image or an (H, W, 3) uint8 RGB array -> the array, upright (files and PIL images
  turned by their EXIF orientation, as the command line reads photos; any PIL mode converted as training reads
  images: sources.to_rgb); a clear error naming `name` otherwise."""
  if isinstance(image, str | os.PathLike):
    path = os.fspath(image)
    if "://" in path:
      raise ValueError(f"{name}: {path} is a URL; this library reads local files only: download it first")
    if os.path.isdir(path):
      raise IsADirectoryError(f"{name}: {path} is a folder; give its image files (the predict command takes folders)")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{name}: no such image file {path}")
    try:
      with Image.open(path) as img:
        img.load()
        return as_image(ImageOps.exif_transpose(img), name)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise ValueError(f"{name}: cannot read {path} as an image ({type(e).__name__}: {e})") from None
  if isinstance(image, Image.Image):
    try:
      image = sources.to_rgb(ImageOps.exif_transpose(image))
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from None
  if not isinstance(image, np.ndarray):
    raise TypeError(f"{name}: expected a numpy array (H, W, 3) uint8 RGB or a PIL image, got {type(image).__name__}")
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"{name}: expected shape (H, W, 3) RGB, got {image.shape}")
  if image.dtype != np.uint8:
    raise ValueError(f"{name}: expected dtype uint8 (0..255), got {image.dtype}")
  if min(image.shape[:2]) == 0:
    raise ValueError(f"{name}: the image is empty ({image.shape[0]}x{image.shape[1]} pixels)")
  return np.ascontiguousarray(image)


def _label_map(labels: "str | os.PathLike | dict[int, str] | None") -> dict[int, str] | None:
  if labels is None or isinstance(labels, dict):
    return None if labels is None else {int(k): str(v) for k, v in labels.items()}
  return categories.read_file(labels)


def clip_xyxy(boxes: np.ndarray, height: float, width: float) -> np.ndarray:
  """xyxy pixel boxes (..., 4) clipped to a height x width image: what a user reads or draws (COCO evaluation keeps
  the unclipped boxes, as official)."""
  return boxes.clip(0, np.asarray([width, height, width, height], np.float32))


class JaxRunner:
  """The inference function of each canvas compiled with XLA on first use (at the Detector's batch size), on the
  first local device, and kept."""

  def __init__(self, functions: Callable[[tuple[int, int]], InferFn], variables: dict, batch_size: int):
    import jax  # pylint: disable=import-outside-toplevel

    from sparse_detr_jax import loop  # pylint: disable=import-outside-toplevel

    self.functions, self.batch_size = functions, batch_size
    self.variables = jax.device_put(variables, jax.local_devices()[0])
    self._compiled: dict[tuple[int, int], Any] = {}
    loop.default_compilation_cache()  # a second process on this machine loads what the first compiled

  def executable(self, canvas: tuple[int, int]):
    if canvas not in self._compiled:
      import jax  # pylint: disable=import-outside-toplevel

      args = input_specs(self.batch_size, canvas)
      self._compiled[canvas] = jax.jit(self.functions(canvas)).lower(self.variables, *args).compile()
    return self._compiled[canvas]

  def __call__(self, canvas: tuple[int, int], image, padding_mask, orig_size) -> dict[str, Any]:
    return self.executable(canvas)(self.variables, image, padding_mask, orig_size)


def read_manifest(directory: str | os.PathLike, kind: str) -> dict[str, Any]:
  """DIR/manifest.json of an export of format `kind` ('jax' or 'onnx'), or a clear error."""
  path = pathlib.Path(directory) / MANIFEST
  if not path.is_file():
    raise FileNotFoundError(f"{path}: not found; expected a directory written by python -m sparse_detr_jax.export")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMATS[kind]:
    other = {v: k for k, v in FORMATS.items()}.get(manifest.get("format"))
    hint = f": an export of --format {other}, read it with Detector.from_{'export' if other == 'jax' else other}"
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMATS[kind]!r}{hint if other else ''}")
  return manifest


def _export_batch(manifest: dict, batch_size: int | None, root: Any) -> int:
  fixed = manifest["batch_size"]
  if fixed and batch_size not in (None, fixed):
    raise ValueError(f"batch_size: the export at {root} has a fixed batch size {fixed}, got {batch_size}")
  return fixed or batch_size or 1


def _names(manifest: dict, root: Any) -> dict[int, str] | None:
  names = None if manifest["categories"] is None else {int(k): v for k, v in manifest["categories"].items()}
  if names is None:
    categories.warn_unknown(str(root))
  return names


def _nested(flat: dict[str, np.ndarray]) -> dict:
  out: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


class Detector:
  """Sparse DETR ready to run on images: see the module docstring. Build it with `from_checkpoint`,
  `from_export` or `from_onnx`; `python -m sparse_detr_jax.export` writes what the last two read."""

  def __init__(
    self,
    runner: Runner,
    data_config: Any,
    names: dict[int, str] | None,
    batch_size: int = 1,
    model=None,
  ):
    """runner: the compiled inference function of each canvas (JaxRunner, onnx_runtime.OnnxRunner);
    data_config: the transform (val_size, max_size) and canvases (buckets), a config's `data` block or its dict;
    names: the model's label map {category id: name} (detections are of these ids only), None where it is unknown
    (every id, 'class N'); batch_size: images per call (more: throughput on an accelerator; padding slots cost
    compute); model: the Flax model when in-process (None for an export)."""
    if batch_size < 1:
      raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
    self.data_config = data_config
    self.canvases = pipeline.data_spec(data_config).buckets  # checks the config
    self.names = None if names is None else dict(names)
    self.batch_size, self.model = int(batch_size), model
    self._ids = None if names is None else np.array(sorted(self.names), np.int64)
    self._run = runner

  @classmethod
  def from_model(
    cls,
    model,
    variables: dict,
    data_config: Any = None,
    batch_size: int = 1,
    names: dict[int, str] | None = None,
  ) -> "Detector":
    """An in-process Detector: a built model (model.build_model), its variables, a data config (default: the
    official COCO evaluation transform and canvases) and its label map (None: unknown, 'class N')."""
    from sparse_detr_jax import config as config_lib  # pylint: disable=import-outside-toplevel

    data_config = data_config or config_lib.data_config()
    infer = inference_function(model, None if names is None else [i for i in names if i < model.config.num_classes])
    return cls(JaxRunner(lambda canvas: infer, variables, batch_size), data_config, names, batch_size, model)

  @classmethod
  def from_checkpoint(
    cls,
    path: str,
    config: "str | ml_collections.ConfigDict | None" = None,
    batch_size: int = 1,
    labels: "str | os.PathLike | dict[int, str] | None" = None,
  ) -> "Detector":
    """From an official .pth (architecture from its args), a directory written by `sparse_detr_jax.convert`,
    a training workdir (its latest checkpoint) or one of its checkpoint step directories (WORKDIR/checkpoints/N).

    The model and its label map (category names) come from the checkpoint, whatever the working directory.
    config: a config file or ConfigDict whose `data` block gives the transform and canvases (its model block is
    not used, but where the checkpoint carries no model: a step directory without its workdir's config.json);
    default: the workdir's config for training checkpoints, else the official COCO evaluation transform and
    canvases. labels: a label file (labels.json or a COCO annotation file) or {id: name}, for a checkpoint
    without a label map (an official checkpoint fine-tuned elsewhere, a workdir of an earlier version).
    """
    # The model code is imported here only: a Detector read `from_export` never loads it.
    from sparse_detr_jax import checkpoints  # pylint: disable=import-outside-toplevel
    from sparse_detr_jax import config as config_lib  # pylint: disable=import-outside-toplevel

    cfg = config_lib.load_config_file(config) if isinstance(config, str | pathlib.Path) else config
    ckpt = checkpoints.find(str(path))
    model_config = checkpoints.inference_model_config(ckpt, cfg)
    model, variables = checkpoints.load(ckpt, model_config if model_config is not None or cfg is None else cfg.model)
    cfg = cfg if cfg is not None else ckpt.run_config
    names = _label_map(labels) if labels is not None else ckpt.names
    if names is None:
      categories.warn_unknown(ckpt.describe())
    return cls.from_model(model, variables, cfg.data if cfg is not None else None, batch_size, names)

  @classmethod
  def from_export(cls, directory: str, batch_size: int | None = None) -> "Detector":
    """A Detector from a jax.export export (`python -m sparse_detr_jax.export`): the serialized functions run
    without the model's Python code. batch_size: default the exported one (any, for an export with a symbolic batch
    dimension: then 1)."""
    import jax  # pylint: disable=import-outside-toplevel
    from jax import export as jax_export  # pylint: disable=import-outside-toplevel

    from sparse_detr_jax import config as config_lib  # pylint: disable=import-outside-toplevel

    root = pathlib.Path(directory)
    manifest = read_manifest(root, "jax")
    platform = jax.local_devices()[0].platform
    platform = {"gpu": "cuda"}.get(platform, platform)
    if platform not in manifest["platforms"]:
      raise ValueError(
        f"{root}: exported for {manifest['platforms']}, this machine runs {platform}; export again with "
        f"--platforms {platform}"
      )
    batch = _export_batch(manifest, batch_size, root)
    with np.load(root / VARIABLES) as f:
      variables = _nested({k: f[k] for k in f.files})
    loaded: dict[tuple[int, int], Any] = {}

    def function(canvas: tuple[int, int]):
      if canvas not in loaded:
        blob = (root / manifest["canvases"][f"{canvas[0]}x{canvas[1]}"]).read_bytes()
        loaded[canvas] = jax_export.deserialize(bytearray(blob)).call
      return loaded[canvas]

    data = config_lib.from_json(manifest["data"])
    return cls(JaxRunner(function, variables, batch), data, _names(manifest, root), batch)

  @classmethod
  def from_onnx(cls, directory: str, threads: int = 0) -> "Detector":
    """A Detector from an ONNX export (`python -m sparse_detr_jax.export --format onnx`), run with ONNX Runtime on
    the CPU: no JAX, Flax or TensorFlow is imported (numpy, pillow and onnxruntime are what it needs). The batch
    size is the exported one; threads: ONNX Runtime's intra-op threads (0: its default, every core)."""
    from sparse_detr_jax import onnx_runtime  # pylint: disable=import-outside-toplevel

    root = pathlib.Path(directory)
    manifest = read_manifest(root, "onnx")
    files = {tuple(int(v) for v in k.split("x")): root / f for k, f in manifest["canvases"].items()}
    if not (root / manifest["weights"]).is_file():  # every graph reads it (external data)
      raise FileNotFoundError(f"{root / manifest['weights']}: not found; the export's manifest.json lists it")
    runner = onnx_runtime.OnnxRunner(files, OUTPUTS, threads)
    return cls(runner, manifest["data"], _names(manifest, root), manifest["batch_size"])

  @property
  def variables(self) -> dict:
    """The weights (an in-process or jax.export Detector)."""
    return self._run.variables

  def function(self, canvas: tuple[int, int]) -> InferFn:
    """The (uncompiled) inference function of a canvas (an in-process or jax.export Detector)."""
    return self._run.functions(tuple(canvas))

  def _batches(self, images: list[np.ndarray]):
    """(pipeline batch, outputs as numpy) per batch of the images grouped by canvas, each image on its own
    smallest canvas (so its detections do not depend on the other images); the next batch is prepared
    while the device runs the current one."""
    count, load = pipeline.eval_batches(sources.ArrayImages(images), self.data_config, self.batch_size, move_up=False)
    pending = None
    for k in range(count):
      batch = load(k)
      canvas = tuple(int(v) for v in batch["image"].shape[1:3])
      out = self._run(canvas, batch["image"], batch["padding_mask"], batch["orig_size"])
      if pending is not None:
        yield pending[0], {k: np.asarray(v) for k, v in pending[1].items()}
      pending = (batch, out)
    if pending is not None:
      yield pending[0], {k: np.asarray(v) for k, v in pending[1].items()}

  def __call__(
    self, images: ImageLike | Sequence[ImageLike], threshold: float = 0.5
  ) -> list[Detection] | list[list[Detection]]:
    """Detections scoring at least `threshold`, best first: a list of dicts {'box': [x0, y0, x1, y1] pixels
    clipped to the image, 'score', 'category_id', 'category'} for one image, one such list per image for a
    list (or a (N, H, W, 3) array) of images. Images: (H, W, 3) uint8 RGB arrays, PIL images or image files' paths,
    any sizes; PIL images and files are turned upright by their EXIF orientation."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.number):
      raise TypeError(f"threshold: expected a number in [0, 1], got {type(threshold).__name__}")
    if not 0.0 <= threshold <= 1.0:
      raise ValueError(f"threshold: expected a score in [0, 1], got {threshold}")
    single = isinstance(images, Image.Image | str | os.PathLike) or (
      isinstance(images, np.ndarray) and images.ndim == 3
    )
    if single:
      images = [images]
    elif isinstance(images, np.ndarray) and images.ndim != 4:
      raise ValueError(f"images: expected (H, W, 3) or (N, H, W, 3) uint8, got shape {images.shape}")
    elif not isinstance(images, np.ndarray | Sequence) or isinstance(images, bytes):
      raise TypeError(f"images: expected an image or a list of images, got {type(images).__name__}")
    if len(images) == 0:
      raise ValueError("images: the list is empty; give at least one image")
    arrays = [as_image(x, "image" if single else f"images[{i}]") for i, x in enumerate(images)]
    found: list[list[Detection]] = [[] for _ in arrays]
    for batch, out in self._batches(arrays):
      for slot in np.flatnonzero(batch["image_id"] >= 0):
        h, w = (int(v) for v in batch["orig_size"][slot])
        keep = out["scores"][slot] >= threshold
        if self._ids is not None:  # only the model's categories (ranked first; the others scored 0)
          keep &= np.isin(out["labels"][slot], self._ids)
        boxes = clip_xyxy(out["boxes"][slot][keep], h, w)
        found[int(batch["image_id"][slot]) - 1] = [
          {"box": [float(v) for v in box], "score": float(s), "category_id": int(c), "category": self.name(int(c))}
          for box, s, c in zip(boxes, out["scores"][slot][keep], out["labels"][slot][keep], strict=True)
        ]
    return found[0] if single else found

  def name(self, category_id: int) -> str:
    return (self.names or {}).get(category_id, f"class {category_id}")

  def draw(self, image: ImageLike, detections: list[Detection]) -> Image.Image:
    """The image with `detections` (this Detector's output for it) drawn: boxes, category names, scores."""
    array = as_image(image, "image")
    if not isinstance(detections, list | tuple) or not all(isinstance(d, dict) for d in detections):
      raise TypeError("detections: expected this Detector's list of detection dicts for the image")
    missing = [k for k in ("box", "category_id", "score") if detections and any(k not in d for d in detections)]
    if missing or any(np.shape(d["box"]) != (4,) for d in detections):
      raise ValueError(f"detections: every detection needs 'box' [x0, y0, x1, y1], 'category_id', 'score' {missing}")
    boxes = np.array([d["box"] for d in detections], np.float32).reshape(-1, 4)
    labels = np.array([d["category_id"] for d in detections], np.int64)
    scores = np.array([d["score"] for d in detections], np.float32)
    return visualize.draw_detections(array, boxes, labels, scores, self.names or {})

  def mechanism(self, image: ImageLike, max_side: int = visualize.MAX_PICTURE_SIDE) -> Image.Image:
    """Sparse DETR's mechanism on one image (visualize.mechanism_picture): per feature level, the encoder
    tokens the scoring network kept and the decoder attention map, on the image as the model saw it."""
    array = as_image(image, "image")
    ((batch, out),) = list(self._batches([array]))
    shapes = [tuple(int(v) for v in s) for s in out["spatial_shapes"]]
    kept, attention = (visualize.level_grids(out[k][0], shapes) for k in ("kept", "attention"))
    view = visualize.model_view(batch, 0)
    return visualize.mechanism_picture(view, batch["image"].shape[1:3], kept, attention, max_side)
