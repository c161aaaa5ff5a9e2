"""Every published-row config builds its model, with the parameter count the paper reports."""

import pathlib
import re

import numpy as np
import pytest
from flax import traverse_util

from sparse_detr_jax import config as config_lib
from sparse_detr_jax import model as model_lib

ALL = sorted(
  p
  for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py")
  if p.stem not in ("common", "__init__")
)
CONFIGS = [p for p in ALL if p.stem.startswith(("r50_", "swint_"))]  # the paper's rows


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_every_config_validates(path):
  c = config_lib.load_config_file(str(path))
  config_lib.validate(c.model)
  assert {"model", "loss", "data", "train", "eval"} <= set(c.keys())


def test_one_config_per_published_row():
  names = {p.stem for p in CONFIGS}
  for bb in ("r50", "swint"):
    assert {f"{bb}_deformable_detr", f"{bb}_efficient_detr"} <= names
    assert {f"{bb}_sparse_detr_rho_0.{i}" for i in range(1, 6)} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_parameter_count_matches_the_paper(path):
  """The paper counts trainable inference parameters: no frozen stem/first stage, no encoder-aux heads."""
  published = float(re.search(r"#Params ([\d.]+)M", path.read_text()).group(1))
  c = config_lib.load_config_file(str(path)).model
  flat = traverse_util.flatten_dict(model_lib.variable_shapes(model_lib.build_model(c))["params"])
  first_aux = model_lib.num_prediction_heads(c) - (c.enc_layers - 1) if c.use_enc_aux_loss else None

  def counted(path):
    top = path[0]
    if top == "backbone" and re.match(r"(conv1|layer1_|patch_embed|layers_0_)", path[1]):
      return False  # frozen with ImageNet weights
    m = re.fullmatch(r"(class|bbox)_embed_(\d+)", top)
    return not (m and first_aux is not None and int(m.group(2)) >= first_aux)  # training-only heads

  n = sum(int(np.prod(v.shape)) for k, v in flat.items() if counted(k))
  assert abs(n / 1e6 - published) < 0.05, (n, published)
