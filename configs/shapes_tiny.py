"""The smallest CPU config (used by the trainer tests): a 1+1-layer Sparse DETR on the shapes data at
32-40 pixels. Not a detector worth evaluating; a fast end-to-end run of every code path.

    python -m sparse_detr_jax.data.shapes data/shapes --train 800 --val 100
    python train.py --config configs/shapes_tiny.py --workdir runs/tiny
"""

from configs import common


def get_config():
  c = common.sparse_detr("none", rho=0.1)
  c.model.update(
    num_classes=7, num_feature_levels=2, enc_layers=1, dec_layers=1, dim_feedforward=64, num_queries=10, dropout=0.0
  )
  common.shapes_data(
    c,
    scales=(32, 40),
    max_size=64,
    crop_resize=(32,),
    crop_size=(24, 32),
    val_size=32,
    buckets=((40, 64), (64, 40), (48, 48)),
    max_boxes=6,
    num_workers=0,
  )
  # The on-device matcher (exact, like scipy's): steps without host callbacks persist in JAX's compilation
  # cache, so the many short test runs compile once.
  c.loss.matcher = "jax"
  c.train.update(batch_size=2, max_steps=4, checkpoint_every=2, log_every=1, eval_at_end=False)
  c.eval.batch_size = 2
  return c
