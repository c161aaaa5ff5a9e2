"""A workdir knows its run: WORKDIR/config.json holds the config that trained it, WORKDIR/labels.json the
category ids and names it was trained on (data.categories).

A rerun in the same workdir resumes from its checkpoints, so it must be the same run: a config that
differs in a field that changes shapes or semantics (model, loss, data plan, optimiser, seed) is
refused before anything is built, naming the fields; so is a dataset with other categories. A workdir
without a checkpoint takes a new config. Fields that only change how the run is
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
from sparse_detr_jax.data import categories

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
  "train.compile_threads",
  "eval.",
  "data.num_workers",
  "data.prefetch",
  "data.coco_dir",
  "data.tfds_data_dir",
)


class ConfigMismatch(ValueError):
  """The workdir holds a run trained with a config that differs where it matters."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a.b': value} of a nested dict."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _harmless(field: str) -> bool:
  return any(field == h or (h.endswith(".") and field.startswith(h)) for h in HARMLESS)


def differences(stored: dict, given: dict) -> dict[str, tuple[Any, Any]]:
  """{field: (stored value, given value)} for every field that differs (JSON-normalised values)."""
  a, b = flatten(stored), flatten(given)
  return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def has_checkpoint(workdir: str) -> bool:
  """Whether a run in `workdir` wrote a checkpoint (a complete step directory WORKDIR/checkpoints/N)."""
  ckpts = pathlib.Path(workdir) / "checkpoints"
  return ckpts.is_dir() and any(p.name.isdigit() and p.is_dir() for p in ckpts.iterdir())


def check(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Raise ConfigMismatch if WORKDIR/config.json belongs to a different run that wrote a checkpoint. Writes nothing:
  `record` does, once everything else is checked. A config.json without a checkpoint (a run that stopped before
  its first one) gives way to this run's config, said in the log."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  try:
    stored = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a JSON config ({e}); move it away to start a new run in this workdir") from None
  diff = differences(stored, json.loads(cfg.to_json_best_effort()))
  bad = {k: v for k, v in diff.items() if not _harmless(k)}
  if bad and not has_checkpoint(workdir):
    logging.warning(
      "%s: the config of a run that wrote no checkpoint; this run's config replaces it (%s)",
      path,
      ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(bad.items())[:6]),
    )
    return
  if bad:
    lines = "\n".join(f"  {k}: {a!r} in the workdir, {b!r} now" for k, (a, b) in bad.items())
    raise ConfigMismatch(
      f"{workdir} holds a run trained with a different config ({path}):\n{lines}\n"
      f"Either rerun with the workdir's config (to resume that run) or give a new --workdir (to start this one)."
    )
  for k, (a, b) in diff.items():
    logging.info("config %s changed for this run: %r -> %r", k, a, b)


def check_labels(names: dict[int, str], workdir: str, where: str) -> None:
  """Raise ConfigMismatch if WORKDIR/labels.json (the label map of a run with a checkpoint) differs from the
  categories of the dataset `where`."""
  stored = categories.read(workdir)
  if stored is None or stored == names or not has_checkpoint(workdir):
    return
  differ = sorted(k for k in set(stored) | set(names) if stored.get(k) != names.get(k))
  shown = ", ".join(
    f"id {k}: {stored.get(k, '<absent>')!r} in the workdir, {names.get(k, '<absent>')!r} now" for k in differ[:5]
  )
  raise ConfigMismatch(
    f"{workdir} holds a run trained on other categories ({pathlib.Path(workdir) / categories.LABELS_FILE} vs "
    f"{where}): {shown}. Resume with the run's dataset, or give a new --workdir (fine-tune from its checkpoint "
    f"with --config.train.init_checkpoint={workdir})"
  )


def record(cfg: ml_collections.ConfigDict, workdir: str, names: dict[int, str]) -> None:
  """(host 0) Write cfg to WORKDIR/config.json and the run's label map to WORKDIR/labels.json."""
  if jax.process_index() != 0:
    return
  path = pathlib.Path(workdir) / CONFIG_FILE
  text = json.dumps(json.loads(cfg.to_json_best_effort()), indent=1, sort_keys=True)
  path.parent.mkdir(parents=True, exist_ok=True)
  if not path.exists() or path.read_text() != text:
    # Other hosts may be reading it right now: they must see the old file or the new one, never a part.
    tmp = path.with_name(f".{CONFIG_FILE}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
  if categories.read(workdir) != names:
    categories.write(workdir, names)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's run was trained with (WORKDIR/config.json)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: not found; expected a training workdir (train.py --workdir)")
  return config_lib.from_json(json.loads(path.read_text()))
