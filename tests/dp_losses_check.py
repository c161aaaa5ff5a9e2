"""Run by test_data_parallel.py in a fresh process with 4 CPU devices: losses inside shard_map over a
`data` axis equal the single-device losses on the same global batch."""

import json
import sys

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sparse_detr_jax import convert, losses

ckpt, npz, solver = sys.argv[1:4]
assert jax.device_count() == 4, jax.devices()
model, variables, mc = convert.load_official(ckpt)
cfg = ml_collections.ConfigDict({"model": mc, "loss": losses.loss_config(matcher=solver)})
d = np.load(npz)
images = np.concatenate([d["images"], d["images"][:, :, :, ::-1]]).transpose(0, 2, 3, 1)  # 4 images
mask = np.concatenate([d["mask"], d["mask"]])
labels = np.zeros((4, 4), np.int32)
boxes = np.tile(np.array([0.5, 0.5, 0.2, 0.2], np.float32), (4, 4, 1))
valid = np.zeros((4, 4), bool)
for i in range(4):
  src = i % 2
  n = len(d[f"target_labels_{src}"])
  labels[i, :n], boxes[i, :n], valid[i, :n] = d[f"target_labels_{src}"], d[f"target_boxes_{src}"], True
valid[3] = False  # one image without boxes: the box count differs per device
targets = {"labels": labels, "boxes": boxes, "valid": valid}


def per_device(params, images, mask, targets):
  out = model.apply({**variables, "params": params}, images, mask)
  ld = losses.compute(out, targets, cfg, axis_name="data")
  ld = {k: v for k, v in ld.items() if k.startswith("loss_")}
  return jax.lax.pmean(ld, "data"), jax.lax.pmean(losses.total(ld, cfg), "data")


mesh = Mesh(np.array(jax.devices()), ("data",))
sharded = jax.jit(
  jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")), out_specs=(P(), P()))
)
dp_losses, dp_total = sharded(variables["params"], images, mask, targets)
one = losses.compute(jax.jit(model.apply)(variables, images, mask), targets, cfg)
one = {k: v for k, v in one.items() if k.startswith("loss_")}
print(
  json.dumps(
    {
      "dp": {k: float(v) for k, v in dp_losses.items()},
      "one": {k: float(v) for k, v in one.items()},
      "dp_total": float(dp_total),
      "one_total": float(losses.total(one, cfg)),
    }
  )
)
