"""How far bfloat16 compute lands from the official float32 outputs: each official fixture's forward with
`model.dtype = "bfloat16"` (float32 parameters, the converted official weights, the fixture's images).

    .venv/bin/python benchmarks/bf16_fixtures.py [--fixtures ../shared/fixtures/official] [--names r50_sparse,...]

Top-k selections make a plain max |diff| meaningless: on these random weights many scores sit within bf16 rounding
of the token and query boundaries, so a few kept tokens and queries differ and the outputs in those slots are other
queries' outputs. The table gives the share of two-stage queries that are the same tokens as the official ones and,
over those queries matched by token, the error of the final logits and boxes; and the scoring network's logits
(before any selection). Median, 99th percentile and max of |bf16 - official|.
"""

import argparse
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from sparse_detr_jax import convert
from sparse_detr_jax import model as model_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAMES = "r50_sparse,swin_sparse,tiny_sparse,tiny_deformable"


def errors(name: str, fixtures: pathlib.Path) -> tuple[list[float], dict[str, np.ndarray]]:
  """(per image, the share of official queries we also chose; |bf16 - official| per compared tensor, flattened)."""
  _, variables, cfg = convert.load_official(str(fixtures / f"{name}.pth"))
  cfg.dtype = "bfloat16"
  with np.load(fixtures / f"{name}.npz") as f:
    d = {k: f[k] for k in f.files}
  images = jnp.asarray(d["images"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  out = jax.tree.map(np.asarray, jax.jit(model_lib.build_model(cfg).apply)(variables, images, jnp.asarray(d["mask"])))
  shared, diffs = [], {"logits": [], "boxes": [], "scoring logits": []}
  for b in range(len(images)):
    ours = out["query_indices"][b]  # (Q,) token of each query
    theirs = np.argsort(-d["enc_logits"][b].max(-1), kind="stable")[: len(ours)]  # the official top-k by objectness
    slot = {int(t): i for i, t in enumerate(theirs)}
    pairs = np.array([(i, slot[int(t)]) for i, t in enumerate(ours) if int(t) in slot])  # (matched, 2)
    shared.append(len(pairs) / len(ours))
    logits = np.abs(out["pred_logits"][b][pairs[:, 0]] - d["pred_logits"][b][pairs[:, 1]])
    diffs["logits"].append(logits[np.isfinite(logits)])
    diffs["boxes"].append(np.abs(out["pred_boxes"][b][pairs[:, 0]] - d["pred_boxes"][b][pairs[:, 1]]))
    if "backbone_mask_prediction" in d:
      diffs["scoring logits"].append(np.abs(out["backbone_mask_prediction"][b] - d["backbone_mask_prediction"][b]))
  return shared, {k: np.concatenate([x.ravel() for x in v]) for k, v in diffs.items() if v}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  default = os.environ.get("SPARSE_DETR_FIXTURES", str(ROOT.parent / "shared" / "fixtures" / "official"))
  p.add_argument("--fixtures", default=default, help="the official fixtures directory")
  p.add_argument("--names", default=NAMES)
  a = p.parse_args()
  fixtures = pathlib.Path(a.fixtures)
  print(f"bfloat16 compute vs the official float32 outputs on {jax.devices()[0].device_kind} ({jax.default_backend()})")
  print("| fixture | queries shared | tensor | median | p99 | max |\n|---|---|---|---|---|---|")
  for name in a.names.split(","):
    if not (fixtures / f"{name}.pth").exists():
      print(f"| {name} | not in {fixtures} | | | | |")
      continue
    shared, diffs = errors(name, fixtures)
    for what, v in diffs.items():
      share = ", ".join(f"{s:.3f}" for s in shared)
      print(f"| {name} | {share} | {what} | {np.median(v):.1e} | {np.percentile(v, 99):.1e} | {v.max():.1e} |")


if __name__ == "__main__":
  main()
