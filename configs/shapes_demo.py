"""The CPU demo: Sparse DETR (rho 0.1, top-k queries, box refinement, encoder aux loss) on the generated
shapes dataset, with the official `--backbone none` (the image itself is the first feature level).

    make demo     # = generate data, then:
    python train.py --config configs/shapes_demo.py --workdir runs/shapes_demo
    python evaluate.py --config configs/shapes_demo.py --workdir runs/shapes_demo

Data: python -m sparse_detr_jax.data.shapes data/shapes --train 800 --val 100
"""
from configs import common


def get_config():
  c = common.sparse_detr("none", rho=0.1)
  c.model.update(num_classes=7, enc_layers=2, dec_layers=2, dim_feedforward=256, num_queries=50, dropout=0.0,
                 enc_n_points=4, dec_n_points=4)
  c.data.update(coco_dir="data/shapes", train_images="train", val_images="val",
                train_annotations="annotations/instances_train.json",
                val_annotations="annotations/instances_val.json",
                scales=[64, 72, 80, 88, 96], max_size=128, crop_resize=[64, 80], crop_size=(48, 64), val_size=80,
                buckets=[(96, 128), (128, 96), (112, 112)], max_boxes=8, num_workers=1)
  c.train.update(batch_size=8, lr=2e-4, max_steps=600, checkpoint_every=200, log_every=20, eval_at_end=True)
  c.eval.batch_size = 8
  return c
