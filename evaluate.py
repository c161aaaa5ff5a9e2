"""COCO evaluation: `python evaluate.py --config configs/NAME.py (--workdir DIR | --checkpoint PATH)`.

--workdir: the latest checkpoint a training run wrote there; results go to the same workdir.
--checkpoint: a checkpoint step directory (DIR/checkpoints/STEP) or an official Sparse DETR .pth
(its architecture comes from the .pth; the config supplies data and eval settings).
Prints the standard 12-number COCO table and writes eval_results.json / eval_metrics.json
(with per-class AP) to --workdir (or next to --checkpoint).
"""
import os
import pathlib

from absl import app, flags
from ml_collections import config_flags

from sparse_detr_jax import convert, evaluator, model as model_lib, trainer
from sparse_detr_jax.data import sources

config_flags.DEFINE_config_file("config", None, "a config file from configs/", lock_config=True)
flags.DEFINE_string("workdir", None, "a training workdir: evaluate its latest checkpoint")
flags.DEFINE_string("checkpoint", None, "checkpoint step directory or official .pth")
flags.mark_flag_as_required("config")
FLAGS = flags.FLAGS


def load(cfg):
  """(model, variables, output directory) for the flags."""
  if FLAGS.checkpoint and FLAGS.checkpoint.endswith(".pth"):
    model, variables, _ = convert.load_official(FLAGS.checkpoint)
    return model, variables, FLAGS.workdir or os.path.dirname(os.path.abspath(FLAGS.checkpoint))
  if FLAGS.checkpoint:
    path = FLAGS.checkpoint
  elif FLAGS.workdir:
    mngr = trainer.checkpoint_manager(FLAGS.workdir, keep=1)
    if mngr.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {FLAGS.workdir}/checkpoints")
    path = str(pathlib.Path(mngr.directory) / str(mngr.latest_step()))
  else:
    raise app.UsageError("give --workdir or --checkpoint")
  return model_lib.build_model(cfg.model), trainer.restore_variables(path), FLAGS.workdir or path


def main(argv):
  del argv
  cfg = FLAGS.config
  model, variables, out = load(cfg)
  evaluator.evaluate(model, variables, sources.build_source(cfg.data, "val"), cfg.data, cfg.eval.batch_size,
                     trainer.data_mesh(), out, tag="eval")


if __name__ == "__main__":
  app.run(main)
