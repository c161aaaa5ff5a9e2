"""Run by test_trainer.py in a fresh process (XLA_FLAGS sets the CPU device count): one train step
of configs/shapes_tiny.py on a fixed global batch of 4 (all pixels valid), on a `data` mesh of every device; prints the
updated parameters' checksum vector and the metrics as JSON."""

import json
import sys

import jax
import numpy as np

from sparse_detr_jax import config as config_lib
from sparse_detr_jax import loop, trainer
from sparse_detr_jax import model as model_lib
from sparse_detr_jax.data import pipeline, sources

cfg = config_lib.load_config_file("configs/shapes_tiny.py")
cfg.data.coco_dir = sys.argv[1]
n = jax.device_count()
cfg.train.batch_size = 4 // n
mesh = trainer.data_mesh()
model = model_lib.build_model(cfg.model)
variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
state, tx, schedules = trainer.new_state(cfg, variables, 4, 10, jax.random.PRNGKey(1))
batch = pipeline.train_dataset(sources.build_source(cfg.data, "train"), cfg.data, 4, 0, 1)[0]
# Every image fully valid: the official per-device quirks (encoder-aux / DAM terms over the per-device
# maximum kept-token count, scoring logits padded to the per-device minimum) then agree between one
# device holding 4 images and 4 devices holding 1, so the step itself can be compared.
batch["padding_mask"][:] = False
batch = loop.global_batch(mesh, {k: batch[k] for k in ("image", "padding_mask", "labels", "boxes", "box_valid")})
state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
new, metrics = trainer.make_train_step(model, cfg, tx, mesh, schedules)(state, batch)
leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(new.params))[0]
print(
  json.dumps(
    {
      "devices": n,
      "params": {jax.tree_util.keystr(k): np.asarray(v).ravel()[:64].tolist() for k, v in leaves},
      "metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
    }
  )
)
