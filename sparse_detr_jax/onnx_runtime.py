"""ONNX exports run with ONNX Runtime (Detector.from_onnx): numpy and onnxruntime only, no JAX.

One InferenceSession per canvas, created on first use and kept; the graphs' inputs are the normalised image
batch (B, H, W, 3) float32, its padding mask (B, H, W) bool and the original sizes (B, 2) int32, as the jax.export
artifacts' (`detector.inference_function`).
"""

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

INPUTS = ("image", "padding_mask", "orig_size")


class OnnxRunner:
  """runner(canvas, image, padding_mask, orig_size) -> {output name: array} (a detector.Runner)."""

  def __init__(self, files: dict[tuple[int, int], pathlib.Path], outputs: Sequence[str], threads: int = 0):
    try:
      import onnxruntime  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ImportError(
        "Detector.from_onnx needs onnxruntime: pip install -c constraints.txt onnxruntime (docs/install.md)"
      ) from None
    self._ort, self.files, self.outputs, self.threads = onnxruntime, dict(files), list(outputs), threads
    missing = [str(f) for f in self.files.values() if not f.is_file()]
    if missing:
      raise FileNotFoundError(f"{missing[0]}: not found; the export's manifest.json lists it")
    self._sessions: dict[tuple[int, int], Any] = {}

  def session(self, canvas: tuple[int, int]):
    if canvas not in self._sessions:
      options = self._ort.SessionOptions()
      options.intra_op_num_threads = self.threads
      self._sessions[canvas] = self._ort.InferenceSession(
        str(self.files[canvas]), options, providers=["CPUExecutionProvider"]
      )
    return self._sessions[canvas]

  def __call__(self, canvas: tuple[int, int], image, padding_mask, orig_size) -> dict[str, np.ndarray]:
    feeds = dict(zip(INPUTS, (image, padding_mask, orig_size), strict=True))
    return dict(zip(self.outputs, self.session(tuple(canvas)).run(self.outputs, feeds), strict=True))
