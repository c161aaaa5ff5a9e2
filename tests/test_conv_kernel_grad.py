"""benchmarks/conv_kernel_grad.py: its layer list is ResNet-50's trained 3x3 convolutions at the canvas, and it runs."""

import sys

import jax
import jax.numpy as jnp
from conftest import ROOT

from sparse_detr_jax import backbone

sys.path.insert(0, str(ROOT / "benchmarks"))
import conv_kernel_grad


def test_layers_are_resnet50s_3x3_convolutions():
  h, w = 97, 130
  feats = jax.eval_shape(
    lambda x: backbone.ResNet50().init_with_output(jax.random.PRNGKey(0), x)[0], jnp.zeros((1, h, w, 3))
  )
  layers = conv_kernel_grad.resnet_3x3_layers(h, w)
  assert sum(count for _, count, *_ in layers) == 13  # layer2-4: 4 + 6 + 3 blocks
  strided = [(hh, ww, c) for _, _, hh, ww, c, s in layers if s == 2]
  assert [(f.shape[1], f.shape[2]) for f in feats] == [(-(-hh // 2), -(-ww // 2)) for hh, ww, _ in strided]
  assert [f.shape[3] for f in feats] == [4 * c for *_, c in strided]  # bottleneck width x 4


def test_benchmark_runs(capsys, monkeypatch):
  monkeypatch.setattr(
    sys, "argv", ["conv_kernel_grad.py", "--height", "64", "--width", "64", "--batch", "1", "--iters", "1"]
  )
  conv_kernel_grad.main()
  last = capsys.readouterr().out.strip().splitlines()[-1]
  fields = dict(kv.split("=") for kv in last.split())
  assert set(fields) == {"xla_ms", "ours_ms", "speedup", "max_rel_diff"}
  assert float(fields["max_rel_diff"]) < 1e-4
