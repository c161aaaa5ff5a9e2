"""Official checkpoint conversion: every manifest key maps, safe loading, re-heading, Orbax round trip."""
import argparse
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, official
from sparse_detr_jax import convert

R50_MANIFESTS = ["r50_sparse_detr_rho_0.1", "r50_deformable_detr", "r50_deformable_detr_topk_bbr"]


def _manifest(name):
  with open(official(f"manifests/{name}.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("name", R50_MANIFESTS)
def test_full_published_r50_configurations_convert_with_nothing_left_over(name):
  man = _manifest(name)
  state = {k: np.zeros(shape, np.float32) for k, shape in man["state_dict"].items()}
  cfg = convert.config_from_args(man["args"], state)
  variables = convert.convert_state_dict(state, cfg)  # raises on unknown / missing / mis-shaped keys
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
  n_frozen = sum(x.size for x in jax.tree_util.tree_leaves(variables["batch_stats"]))
  unique = {}
  for k, shape in man["state_dict"].items():   # aliases (shared or re-registered heads) count once
    if not k.startswith("transformer.decoder.class_embed") and not k.startswith("transformer.decoder.bbox_embed") \
        and not k.startswith("transformer.encoder.class_embed") and not k.startswith("transformer.encoder.bbox_embed"):
      unique[k] = int(np.prod(shape))
  if not cfg.with_box_refine:  # one head shared by every decoder layer
    unique = {k: v for k, v in unique.items() if not (k.startswith(("class_embed.", "bbox_embed.")) and
                                                      not k.startswith(("class_embed.0.", "bbox_embed.0.")))}
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


def test_pickle_that_runs_code_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {tmp_path}/pwned",))
  path = tmp_path / "evil.pth"
  with open(path, "wb") as f:
    pickle.dump({"model": {}, "args": Evil()}, f)
  with pytest.raises(ValueError, match="refused to load"):
    convert.read_checkpoint(str(path))
  assert not (tmp_path / "pwned").exists()


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
  np.testing.assert_array_equal(np.asarray(v["params"]["bbox_embed_0"]["layers_0"]["kernel"]),
                                np.asarray(full["params"]["bbox_embed_0"]["layers_0"]["kernel"]))
  out = jax.jit(model.apply)(v, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32), bool))
  assert out["pred_logits"].shape == (1, cfg.num_queries, 5)


def test_cli_writes_an_orbax_checkpoint_that_loads_back(tmp_path):
  path = str(official("tiny_deformable.pth"))
  convert.main([path, str(tmp_path / "out")])
  model, v, cfg = convert.load_converted(str(tmp_path / "out"))
  _, ref, ref_cfg = convert.load_official(path)
  assert cfg.to_dict() == ref_cfg.to_dict()
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), v, ref)
