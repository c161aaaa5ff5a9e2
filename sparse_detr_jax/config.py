"""Model configuration: the official Sparse DETR defaults as an ml_collections ConfigDict.

Field names follow the official `main.py` arguments so a config reads like the official command line.
"""

import importlib.util
import os
import sys
from typing import Any

import ml_collections

# The official code's backbones ('none' = the image itself is the first feature level), and this
# project's small_convnet for CPU demos (backbone.SmallConvNet).
BACKBONES = ("resnet50", "none", "swin-t", "small_convnet")
SCAN_SETTINGS = ("auto", "scan", "unroll")  # model.scan_layers

# Landscape canvases (h, w) for COCO at scales 480..800 / max_size 1333, and their transposes.
_LANDSCAPE = ((544, 736), (640, 864), (736, 992), (800, 1088), (800, 1333), (704, 704))
COCO_BUCKETS = tuple(sorted({b for h, w in _LANDSCAPE for b in ((h, w), (w, h))}))


def model_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Official Sparse DETR model defaults (R50, rho 0.1, two-stage, box refinement, enc aux loss)."""
  c = ml_collections.ConfigDict()
  c.backbone = "resnet50"
  c.num_classes = 91  # COCO category ids 1..90 plus the unused 0, as official
  c.hidden_dim = 256
  c.nheads = 8
  c.enc_layers = 6
  c.dec_layers = 6
  c.dim_feedforward = 1024
  c.dropout = 0.1
  c.num_feature_levels = 4
  c.enc_n_points = 4
  c.dec_n_points = 4
  c.num_queries = 300
  c.with_box_refine = True
  c.two_stage = True
  c.eff_query_init = True  # decoder content queries = top-k encoder tokens (Efficient DETR)
  c.eff_specific_head = True  # two-stage objectness = max over class logits
  c.use_enc_aux_loss = True  # detection heads on the kept tokens after each encoder layer
  c.rho = 0.1  # share of encoder tokens updated by the encoder (0 = dense)
  c.aux_loss = True
  c.dtype = "float32"  # compute dtype; parameters stay float32
  c.scan_layers = "auto"  # 'scan' | 'unroll' | 'auto' (scan on accelerators): see scans_layers
  # Swin backbone shape (used when backbone == 'swin-t'); swin-t defaults, as the official yaml.
  c.swin = ml_collections.ConfigDict(
    dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2)
  )
  c.update(overrides)
  return c


def data_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Official COCO input defaults (DETR transforms) plus this project's static-shape settings."""
  d = ml_collections.ConfigDict()
  d.source = "coco"  # 'coco' (a COCO-format directory) or 'tfds'
  d.coco_dir = "./data/coco"  # the official --coco_path layout
  d.train_images = "train2017"
  d.train_annotations = "annotations/instances_train2017.json"
  d.val_images = "val2017"
  d.val_annotations = "annotations/instances_val2017.json"
  d.tfds_name = "coco/2017"
  d.tfds_data_dir = None
  d.tfds_train_split = "train"
  d.tfds_val_split = "validation"
  # Sequences are tuples so that a command line can override them: --config.data.buckets='((800, 1088),)'.
  d.scales = tuple(range(480, 801, 32))  # RandomResize scales (shorter side), as official
  d.max_size = 1333
  d.crop_resize = (400, 500, 600)  # RandomResize before RandomSizeCrop
  d.crop_size = (384, 600)  # RandomSizeCrop(min, max)
  d.val_size = 800
  # Static canvases (h, w): the jitted step compiles once per bucket. Chosen with
  # benchmarks/padding_waste.py on a COCO-like size distribution (see its docstring for the numbers).
  d.buckets = COCO_BUCKETS
  d.max_boxes = 100  # COCO's most crowded image has 93 non-crowd boxes
  d.num_workers = 2  # grain worker processes per host (0: load in the main process)
  d.prefetch = 2  # batches buffered per worker
  d.update(overrides)
  return d


def train_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Official optimisation recipe (main.py defaults) plus checkpointing and logging."""
  t = ml_collections.ConfigDict()
  t.batch_size = 2  # per device, as official (--batch_size 2 on each GPU)
  t.epochs = 50
  t.lr_drop = 40  # lr x0.1 after this many epochs
  t.lr = 2e-4  # scaled by sqrt(global batch / 16), as official
  t.lr_backbone = 2e-5
  t.lr_linear_proj_mult = 0.1  # sampling_offsets and reference_points
  t.weight_decay = 1e-4
  t.clip_max_norm = 0.1
  t.freeze_early_backbone = True  # ResNet stem + layer1 (official); Swin patch_embed + first stage
  t.seed = 42
  t.max_steps = 0  # > 0: stop after this many steps instead of `epochs`
  t.init_checkpoint = ""  # an official Sparse DETR .pth to start from (fine-tuning)
  t.backbone_checkpoint = ""  # torchvision resnet50 ImageNet .pth (the official starting point)
  t.checkpoint_every = 2000  # steps
  t.keep_checkpoints = 3
  t.log_every = 50  # steps
  t.eval_every_steps = 0  # 0: only at the end (eval_at_end)
  t.eval_at_end = True
  t.picture_every_steps = 5000  # TensorBoard pictures (detections, kept tokens, DAM) of a val image; 0: never
  t.on_nonfinite = "stop"  # 'stop' (no update, no checkpoint, clear error) or 'skip' the update
  t.precompile = "auto"  # compile the step for every bucket before step 1: 'auto' (GPU/TPU), 'always', 'never'
  t.compile_threads = 0  # canvases precompiled at once (0: one per canvas, at most the host's cores and one per 8 GiB
  # of available memory)
  t.update(overrides)
  return t


def eval_config(**overrides: Any) -> ml_collections.ConfigDict:
  e = ml_collections.ConfigDict()
  e.batch_size = 2  # per device
  e.update(overrides)
  return e


def scans_layers(c: ml_collections.ConfigDict) -> bool:
  """Whether the encoder and decoder layers run as one `lax.scan` each, and the losses of their prediction sets as
  one vmapped computation (model.scan_layers): 'scan', 'unroll', or 'auto' (the default): scanned on accelerators,
  where XLA then compiles one layer body (and one matching) instead of one per layer, unrolled on the CPU. Both
  compute the same values up to float rounding; under dropout their random streams differ."""
  setting = c.get("scan_layers", "auto")
  if setting not in SCAN_SETTINGS:
    raise ValueError(f"model.scan_layers: expected one of {SCAN_SETTINGS}, got {setting!r}")
  import jax  # pylint: disable=import-outside-toplevel

  return setting == "scan" or (setting == "auto" and jax.default_backend() != "cpu")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raise ValueError naming the field when a model config cannot be built."""
  if c.backbone not in BACKBONES:
    raise ValueError(f"model.backbone: expected one of {BACKBONES}, got {c.backbone!r}")
  if c.get("scan_layers", "auto") not in SCAN_SETTINGS:
    raise ValueError(f"model.scan_layers: expected one of {SCAN_SETTINGS}, got {c.scan_layers!r}")
  if not 0.0 <= c.rho < 1.0:
    raise ValueError(f"model.rho: expected 0 <= rho < 1, got {c.rho}")
  if c.hidden_dim % c.nheads or c.hidden_dim % 32:
    raise ValueError(f"model.hidden_dim: {c.hidden_dim} must divide by nheads ({c.nheads}) and 32 (GroupNorm)")
  if c.two_stage and not c.with_box_refine:
    raise ValueError(
      "model.two_stage without model.with_box_refine is not a published configuration "
      "(the official Deformable DETR and Sparse DETR codes disagree on it): set both"
    )
  if c.two_stage and c.hidden_dim != 256:
    raise ValueError(
      "model.hidden_dim: two-stage models need 256 (the official query position "
      "embedding hard-codes 128 features per box coordinate)"
    )
  n_backbone = {"none": 1}.get(c.backbone, 3)
  if c.num_feature_levels < n_backbone:
    raise ValueError(f"model.num_feature_levels: need at least {n_backbone} for backbone {c.backbone!r}")


def _tuples(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def from_json(d: dict[str, Any]) -> ml_collections.ConfigDict:
  """A config read back from JSON (a workdir's config.json, an export's manifest), lists turned back into
  the tuples configs hold (buckets, scales, Swin depths)."""
  return ml_collections.ConfigDict(_tuples(d))


def make_importable(path: str) -> None:
  """Config files import their siblings as `configs.common`: put the folder holding `configs/` on sys.path, so
  that a config file loads from any working directory."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.append(root)


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file such as configs/r50_sparse_detr_rho_0.1.py."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such config file")
  make_importable(path)
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3].replace(".", "_"), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path}: a config file must define get_config()")
  return module.get_config()
