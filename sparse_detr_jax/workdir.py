"""A workdir knows its run: WORKDIR/config.json holds the config that trained it.

A rerun in the same workdir resumes from its checkpoints, so it must be the same run: a config that
differs in a field that changes shapes or semantics (model, loss, data plan, optimiser, seed) is
refused before anything is built, naming the fields. Fields that only change how the run is
watched or how long it goes on (`HARMLESS`) may differ; the differences are logged.
"""

import json
import logging
import os
import pathlib
from typing import Any

import jax
import ml_collections

from sparse_detr_jax import config as config_lib

CONFIG_FILE = "config.json"

# Dotted fields (or `block.` prefixes) a resumed run may change.
HARMLESS = (
  "model.scan_layers",
  "train.max_steps",
  "train.epochs",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.log_every",
  "train.eval_every_steps",
  "train.eval_at_end",
  "train.picture_every_steps",
  "train.on_nonfinite",
  "train.precompile",
  "eval.",
  "data.num_workers",
  "data.prefetch",
  "data.coco_dir",
  "data.tfds_data_dir",
)


class ConfigMismatch(ValueError):
  """The workdir holds a run trained with a config that differs where it matters."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _harmless(field: str) -> bool:
  return any(field == h or (h.endswith(".") and field.startswith(h)) for h in HARMLESS)


def differences(stored: dict, given: dict) -> dict[str, tuple[Any, Any]]:
  """{field: (stored value, given value)} for every field that differs (JSON-normalised values)."""
  a, b = _flat(stored), _flat(given)
  return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_and_record(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Raise ConfigMismatch if WORKDIR/config.json belongs to a different run; else (host 0) write cfg there."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  given = json.loads(cfg.to_json_best_effort())
  if path.exists():
    try:
      stored = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not a JSON config ({e}); move it away to start a new run in this workdir") from None
    diff = differences(stored, given)
    bad = {k: v for k, v in diff.items() if not _harmless(k)}
    if bad:
      lines = "\n".join(f"  {k}: {a!r} in the workdir, {b!r} now" for k, (a, b) in bad.items())
      raise ConfigMismatch(
        f"{workdir} holds a run trained with a different config ({path}):\n{lines}\n"
        f"Either rerun with the workdir's config (to resume that run) or give a new --workdir (to start this one)."
      )
    for k, (a, b) in diff.items():
      logging.info("config %s changed for this run: %r -> %r", k, a, b)
  text = json.dumps(given, indent=1, sort_keys=True)
  if jax.process_index() == 0 and (not path.exists() or path.read_text() != text):
    # Other hosts may be reading it right now: they must see the old file or the new one, never a part.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{CONFIG_FILE}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's run was trained with (WORKDIR/config.json)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: not found; expected a training workdir (train.py --workdir)")
  return config_lib.from_json(json.loads(path.read_text()))
