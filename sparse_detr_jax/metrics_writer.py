"""Scalars, text and images to TensorBoard (tensorboardX event files in the workdir); scalars also as
JSON lines in WORKDIR/metrics.jsonl ({"step": N, name: value, ...} per logged step)."""

import json
import pathlib

import numpy as np


class MetricsWriter:
  """Writes on host 0 only (`enabled`); other hosts keep their console log."""

  def __init__(self, logdir: str, enabled: bool = True):
    self._w = None
    self._jsonl = pathlib.Path(logdir) / "metrics.jsonl"
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

      self._w = SummaryWriter(logdir)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._w:
      for k, v in values.items():
        if np.isfinite(v):
          self._w.add_scalar(k, v, step)
      self._w.flush()
      with open(self._jsonl, "a") as f:
        f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")

  def text(self, step: int, tag: str, text: str) -> None:
    if self._w:
      self._w.add_text(tag, f"```\n{text}\n```", step)

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """uint8 (H, W, 3)."""
    if self._w:
      self._w.add_image(tag, image, step, dataformats="HWC")
      self._w.flush()

  def close(self) -> None:
    if self._w:
      self._w.close()
