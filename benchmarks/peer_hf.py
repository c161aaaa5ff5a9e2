"""This project against its PyTorch peer, Hugging Face transformers' DeformableDetrForObjectDetection, in one
run on one machine.

    .venv/bin/pip install -e '.[bench]'      # transformers and PyTorch (CPU build); not needed by the tests
    .venv/bin/python benchmarks/peer_hf.py [--height 800 --width 1066] [--train-height 384 --train-width 512]

The peer has the same architecture as this project's rho 0 row (configs/r50_efficient_detr.py): ResNet-50
(random weights), 6+6 layers, two-stage proposals with box refinement, 300 queries, 91 classes.
Forward: batch 1 at --height x --width, inference mode. Training step: batch 2 at the train size, 10
boxes per image, AdamW with clipping; PyTorch eager vs this project's jitted step (losses.py's full
objective; rho 0.1 adds the scoring loss and encoder aux heads). Times are warm means; the ratio column
is the peer's time over ours (> 1: ours is faster). Both use every core (torch threads = cpu count).
"""

import argparse
import os
import time

import jax
import torch
import train_step

from sparse_detr_jax import benchmark
from sparse_detr_jax import config as config_lib
from sparse_detr_jax import model as model_lib

ROWS = {
  "rho 0 (Efficient DETR)": "configs/r50_efficient_detr.py",
  "rho 0.1 (Sparse DETR)": "configs/r50_sparse_detr_rho_0.1.py",
}


def peer_model(train: bool):
  from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

  cfg = DeformableDetrConfig(  # ResNetConfig's defaults are ResNet-50; weights random, nothing downloaded
    backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"]),
    num_labels=91,
    num_queries=300,
    two_stage=True,
    with_box_refine=True,
    two_stage_num_proposals=300,
    auxiliary_loss=True,
    encoder_layers=6,
    decoder_layers=6,
    encoder_ffn_dim=1024,
    decoder_ffn_dim=1024,
  )
  return DeformableDetrForObjectDetection(cfg).train(train)


def timed(fn, iters: int) -> float:
  fn()  # warm-up
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - start) / iters


def peer_forward_seconds(h: int, w: int, iters: int) -> float:
  model = peer_model(train=False)
  x, mask = torch.randn(1, 3, h, w), torch.ones(1, h, w, dtype=torch.long)
  with torch.inference_mode():
    return timed(lambda: model(pixel_values=x, pixel_mask=mask), iters)


def peer_train_seconds(h: int, w: int, iters: int) -> float:
  model = peer_model(train=True)
  opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
  g = torch.Generator().manual_seed(0)
  x, mask = torch.randn(2, 3, h, w, generator=g), torch.ones(2, h, w, dtype=torch.long)
  labels = [
    {
      "class_labels": torch.randint(1, 91, (10,), generator=g),
      "boxes": torch.cat([0.2 + 0.6 * torch.rand(10, 2, generator=g), 0.05 + 0.25 * torch.rand(10, 2, generator=g)], 1),
    }
    for _ in range(2)
  ]

  def step():
    opt.zero_grad()
    model(pixel_values=x, pixel_mask=mask, labels=labels).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    opt.step()

  return timed(step, iters)


def our_forward_seconds(path: str, h: int, w: int) -> float:
  model = model_lib.build_model(config_lib.load_config_file(path).model)
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  return 1.0 / benchmark.images_per_second(jax.jit(model.apply), variables, 1, h, w)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--height", type=int, default=800)
  p.add_argument("--width", type=int, default=1066)
  p.add_argument("--train-height", type=int, default=384)
  p.add_argument("--train-width", type=int, default=512)
  p.add_argument("--iters", type=int, default=3)
  a = p.parse_args()
  torch.set_num_threads(os.cpu_count())
  if jax.device_count() != 1:
    raise SystemExit("run with one JAX device (the peer uses one)")
  rows = [("forward", "peer (HF transformers, PyTorch)", peer_forward_seconds(a.height, a.width, a.iters))]
  rows += [("forward", name, our_forward_seconds(path, a.height, a.width)) for name, path in ROWS.items()]
  rows.append(
    ("train step", "peer (HF transformers, PyTorch)", peer_train_seconds(a.train_height, a.train_width, a.iters))
  )
  rows += [
    ("train step", name, train_step.step_seconds(path, (a.train_height, a.train_width), 2, a.iters)[1])
    for name, path in ROWS.items()
  ]
  print(
    f"device: JAX {jax.devices()[0].device_kind}, torch {torch.__version__} CPU x{torch.get_num_threads()}; "
    f"forward {a.height}x{a.width} batch 1, train step {a.train_height}x{a.train_width} batch 2"
  )
  print("| what | model | seconds | peer / this |\n|---|---|---|---|")
  for what, name, sec in rows:
    peer = next(s for w_, n, s in rows if w_ == what and n.startswith("peer"))
    print(f"| {what} | {name} | {sec:.3f} | {peer / sec:.2f} |")


if __name__ == "__main__":
  main()
