"""Official checkpoint conversion: every manifest key maps (both ways), safe loading, re-heading, Orbax round trip."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import official
from PIL import Image

from sparse_detr_jax import convert, to_official
from sparse_detr_jax.data import categories
from sparse_detr_jax.swin import relative_position_index

MANIFESTS = [
  "r50_sparse_detr_rho_0.1",
  "r50_deformable_detr",
  "r50_deformable_detr_topk_bbr",
  "swint_sparse_detr_rho_0.1",
]


def _manifest(name):
  with open(official(f"manifests/{name}.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("name", MANIFESTS)
def test_full_published_configurations_convert_with_nothing_left_over(name):
  man = _manifest(name)
  state = {k: np.zeros(shape, np.float32) for k, shape in man["state_dict"].items()}
  for k in state:
    if k.endswith("relative_position_index"):  # a computed buffer: the checkpoint holds the true index
      state[k] = relative_position_index(int(round(state[k].shape[0] ** 0.5)))
  cfg = convert.config_from_args(man["args"], state)
  variables = convert.convert_state_dict(state, cfg)  # raises on unknown / missing / mis-shaped keys
  if cfg.backbone == "swin-t":
    assert (cfg.swin.embed_dim, tuple(cfg.swin.depths), tuple(cfg.swin.num_heads), cfg.swin.window_size) == (
      96,
      (2, 2, 6, 2),
      (3, 6, 12, 24),
      7,
    )
  # and back (to_official): every official key with its shape; the official args but two the manifests were made
  # with (on a CPU, without downloading ImageNet weights), which official_args leaves at the official defaults
  written = to_official.state_dict(variables, cfg)
  assert {k: list(v.shape) for k, v in written.items()} == man["state_dict"]
  assert vars(to_official.official_args(cfg)) == man["args"] | {"device": "cuda", "backbone_from_scratch": False}
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
  n_frozen = sum(x.size for x in jax.tree_util.tree_leaves(variables.get("batch_stats", {})))
  unique = {}
  for k, shape in man["state_dict"].items():  # aliases (shared or re-registered heads) count once
    if k.endswith("relative_position_index"):
      continue
    if (
      not k.startswith("transformer.decoder.class_embed")
      and not k.startswith("transformer.decoder.bbox_embed")
      and not k.startswith("transformer.encoder.class_embed")
      and not k.startswith("transformer.encoder.bbox_embed")
    ):
      unique[k] = int(np.prod(shape))
  if not cfg.with_box_refine:  # one head shared by every decoder layer
    unique = {
      k: v
      for k, v in unique.items()
      if not (k.startswith(("class_embed.", "bbox_embed.")) and not k.startswith(("class_embed.0.", "bbox_embed.0.")))
    }
  assert n_params + n_frozen == sum(unique.values())


def test_tampered_alias_and_unknown_key_are_listed():
  man = _manifest("r50_sparse_detr_rho_0.1")
  state = {k: np.zeros(shape, np.float32) for k, shape in man["state_dict"].items()}
  cfg = convert.config_from_args(man["args"], state)
  bad = dict(state)
  bad["transformer.decoder.class_embed.3.bias"] = np.ones(91, np.float32)
  bad["transformer.something_new.weight"] = np.zeros(3, np.float32)
  del bad["transformer.encoder.layers.2.norm1.weight"]
  with pytest.raises(ValueError) as e:
    convert.convert_state_dict(bad, cfg)
  msg = str(e.value)
  assert "transformer.something_new.weight" in msg
  assert "encoder_layers_2/norm1/scale" in msg
  assert "transformer.decoder.class_embed.3.bias" in msg


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such checkpoint"):
    convert.load_official(str(tmp_path / "nope.pth"))


def test_reinitialised_class_heads_for_another_dataset():
  path = str(official("tiny_sparse.pth"))
  _, full, _ = convert.load_official(path)
  model, v, cfg = convert.load_official(path, num_classes=5)
  assert cfg.num_classes == 5
  assert v["params"]["class_embed_0"]["kernel"].shape == (256, 5)
  np.testing.assert_allclose(np.asarray(v["params"]["class_embed_0"]["bias"]), -np.log(99.0), rtol=1e-6)
  np.testing.assert_array_equal(
    np.asarray(v["params"]["bbox_embed_0"]["layers_0"]["kernel"]),
    np.asarray(full["params"]["bbox_embed_0"]["layers_0"]["kernel"]),
  )
  out = jax.jit(model.apply)(v, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32), bool))
  assert out["pred_logits"].shape == (1, cfg.num_queries, 5)


def convert_cli(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "sparse_detr_jax.convert", *args], cwd=cwd, capture_output=True, text=True, timeout=300
  )


@pytest.mark.parametrize("name", ["tiny_deformable", "swin_sparse"])
def test_cli_writes_an_orbax_checkpoint_that_loads_back(tmp_path, name):
  """Run from another directory, as a user runs it: the weights, the config and COCO's label map."""
  path = str(official(name + ".pth"))
  run = convert_cli(path, "out", cwd=tmp_path)
  assert run.returncode == 0 and "COCO's category names" in run.stdout, run.stderr[-3000:]
  model, v, cfg = convert.load_converted(str(tmp_path / "out"))
  _, ref, ref_cfg = convert.load_official(path)
  assert cfg.to_dict() == ref_cfg.to_dict()
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), v, ref)
  assert categories.read(tmp_path / "out") == categories.COCO_CATEGORIES


def test_cli_errors_are_one_line_and_new_class_heads_have_no_names(tmp_path):
  Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
  for args, message in [
    (["nope.pth", "out"], "convert.py: nope.pth: no such checkpoint file"),
    (["photo.png", "out"], "convert.py: photo.png"),
    (["only_one.pth"], "convert.py: give the official checkpoint and the output directory"),
    ([str(official("tiny_sparse.pth")), "out", "--num_classes=0"], "--num_classes: expected a positive number"),
  ]:
    run = convert_cli(*args, cwd=tmp_path)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and message in lines[-1] and "Traceback" not in run.stderr, run.stderr[-2000:]
  run = convert_cli(str(official("tiny_sparse.pth")), "out", "--num_classes=5", cwd=tmp_path)
  assert run.returncode == 0 and "5 class logits without names" in run.stdout, run.stderr[-3000:]
  assert categories.read(tmp_path / "out") is None
  assert "lack the Sparse DETR fields of `args` and are refused" in convert_cli("--help", cwd=tmp_path).stdout


def test_swin_width_and_depth_are_read_off_the_checkpoint():
  state, args = convert.read_checkpoint(str(official("swin_sparse.pth")))
  cfg = convert.config_from_args(args, state)
  assert (cfg.swin.embed_dim, tuple(cfg.swin.depths), tuple(cfg.swin.num_heads), cfg.swin.window_size) == (
    48,
    (2, 2, 2, 2),
    (3, 6, 12, 24),
    7,
  )
  bad = dict(state)
  key = "backbone.0.body.layers.0.blocks.0.attn.relative_position_index"
  bad[key] = bad[key][::-1].copy()
  with pytest.raises(ValueError, match="relative position index"):
    convert.convert_state_dict(bad, cfg)
