"""Shared config: the official Sparse DETR defaults (model, loss, data, training) that every row of the paper
starts from.

A row's config file calls `row(...)` with the flags of its official script; see e.g.
configs/r50_sparse_detr_rho_0.1.py. Run: `python train.py --config configs/NAME.py --workdir DIR`.
"""

import ml_collections

from sparse_detr_jax import config as config_lib
from sparse_detr_jax import losses


def row(
  backbone: str, rho: float = 0.0, topk_bbr: bool = True, enc_aux_loss: bool = False
) -> ml_collections.ConfigDict:
  """One row of the paper's Table 1: backbone, keeping ratio rho, top-k queries & box refinement."""
  c = ml_collections.ConfigDict()
  c.model = config_lib.model_config(
    backbone=backbone,
    rho=rho,
    two_stage=topk_bbr,
    with_box_refine=topk_bbr,
    eff_query_init=topk_bbr,
    eff_specific_head=topk_bbr,
    use_enc_aux_loss=enc_aux_loss,
  )
  c.loss = losses.loss_config()
  c.data = config_lib.data_config()
  c.train = config_lib.train_config()
  c.eval = config_lib.eval_config()
  return c


def sparse_detr(backbone: str, rho: float) -> ml_collections.ConfigDict:
  """Sparse DETR: `--with_box_refine --two_stage --eff_query_init --eff_specific_head --use_enc_aux_loss --rho R`."""
  return row(backbone, rho=rho, topk_bbr=True, enc_aux_loss=True)


def shapes_data(c: ml_collections.ConfigDict, **overrides) -> None:
  """Point `c.data` at the generated shapes dataset (python -m sparse_detr_jax.data.shapes data/shapes)."""
  c.data.update(
    coco_dir="data/shapes",
    train_images="train",
    val_images="val",
    train_annotations="annotations/instances_train.json",
    val_annotations="annotations/instances_val.json",
    **overrides,
  )
