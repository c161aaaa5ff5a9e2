"""The CPU demo: Sparse DETR (rho 0.1, top-k queries, box refinement, encoder aux loss) on the generated
shapes dataset, with the small from-scratch `small_convnet` backbone (strides 8-32; the official
`none` backbone makes ~16k tokens per 128x96 image, 25x slower here).

    make demo     # = create .venv, then:
    python -m sparse_detr_jax.data.shapes data/shapes --train 2000 --val 200 --seed 0
    python train.py --config configs/shapes_demo.py --workdir runs/shapes_demo --noretain_host_memory
    python evaluate.py --config configs/shapes_demo.py --workdir runs/shapes_demo --noretain_host_memory
    python -m sparse_detr_jax.predict --config configs/shapes_demo.py --workdir runs/shapes_demo \
        --threshold 0.3 --mechanism --out runs/shapes_demo/pictures data/shapes/val/01000001.jpg ...

5 epochs of 2000 images at batch 8 (~1240 steps, ~0.4 s each on 2 CPU cores), lr x0.1 after epoch 4.
Results: see the README ("Quick start").
"""

from configs import common


def get_config():
  c = common.sparse_detr("small_convnet", rho=0.1)
  c.model.update(
    num_classes=7,
    enc_layers=2,
    dec_layers=2,
    dim_feedforward=256,
    num_queries=50,
    dropout=0.0,
    enc_n_points=4,
    dec_n_points=4,
  )
  common.shapes_data(
    c,
    scales=(64, 72, 80, 88, 96),
    max_size=128,
    crop_resize=(64, 80),
    crop_size=(48, 64),
    val_size=80,
    buckets=((96, 128), (128, 96), (112, 112)),
    max_boxes=8,
    num_workers=1,
  )
  # The backbone is trained from scratch, so at the full learning rate (official: 2e-5 for a pretrained one).
  c.train.update(
    batch_size=8,
    epochs=5,
    lr_drop=4,
    lr=2e-4,
    lr_backbone=2e-4,
    checkpoint_every=200,
    log_every=50,
    eval_at_end=False,
    picture_every_steps=400,
  )
  c.eval.batch_size = 8
  return c
