"""Post-processing against the official PostProcess outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_npz

from sparse_detr_jax.postprocess import postprocess


@pytest.mark.parametrize("name", ["tiny_sparse", "r50_sparse"])
def test_matches_official_postprocess(name):
  d = load_npz(name)
  outputs = {"pred_logits": jnp.asarray(d["pred_logits"]), "pred_boxes": jnp.asarray(d["pred_boxes"])}
  got = jax.jit(postprocess)(outputs, jnp.asarray(d["post_orig_sizes"]))
  np.testing.assert_allclose(np.asarray(got["scores"]), d["post_scores"], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got["labels"]), d["post_labels"])
  np.testing.assert_allclose(np.asarray(got["boxes"]), d["post_boxes_xyxy"], atol=1e-3)
