"""COCO evaluation: `python evaluate.py [--config configs/NAME.py] (--workdir DIR | --checkpoint PATH)`.

--workdir: the latest checkpoint a training run wrote there, with the run's config (WORKDIR/config.json) unless
--config is given; results go to the same workdir.
--checkpoint: a checkpoint step directory (DIR/checkpoints/STEP), an official Sparse DETR .pth or a directory
written by sparse_detr_jax.convert. The model is always the checkpoint's own; the config supplies the data and
eval settings. Prints the standard 12-number COCO table and writes eval_results.json / eval_metrics.json
(with per-class AP) to --out, else --workdir, else the checkpoint's workdir or the directory holding it (said on
the last line). COCOeval scores the annotation file's categories: detections of other ids count for nothing.
"""

from absl import flags, logging
from ml_collections import config_flags

from sparse_detr_jax import checkpoints, cli, compiled, evaluator, hostmem, logs, loop, trainer, xla_flags
from sparse_detr_jax.data import sources

config_flags.DEFINE_config_file("config", None, "a config file whose data and eval blocks to use", lock_config=True)
flags.DEFINE_string("workdir", None, "a training workdir: evaluate its latest checkpoint")
flags.DEFINE_string("checkpoint", None, "checkpoint step directory, official .pth or converted directory")
flags.DEFINE_string("out", None, "where eval_results.json and eval_metrics.json go (default: see above)")
flags.DEFINE_string(
  "compiled_dir",
  None,
  "inference functions saved by `preflight --save_compiled DIR` (eval.batch_size per chip): loaded instead of"
  " compiled where they match this run (a saved program is as trusted as code: loading it unpickles it)",
)
flags.DEFINE_string("compilation_cache_dir", loop.DEFAULT_CACHE_DIR, "JAX's persistent compilation cache ('' = off)")
flags.DEFINE_bool("retain_host_memory", True, "keep freed host memory for reuse (sparse_detr_jax/hostmem.py)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logs.quiet_library_logs()
  if FLAGS.retain_host_memory:
    hostmem.retain_freed_memory()
  xla_flags.set_gpu_flags()
  loop.enable_compilation_cache(FLAGS.compilation_cache_dir)
  if not (FLAGS.workdir or FLAGS.checkpoint):
    cli.usage_error("give --workdir or --checkpoint")
  ckpt = checkpoints.find(FLAGS.checkpoint or FLAGS.workdir)
  cfg = FLAGS.config if FLAGS.config is not None else ckpt.run_config
  if cfg is None:
    cli.usage_error(f"--config: needed with --checkpoint {FLAGS.checkpoint}, which carries no data or eval settings")
  model, variables = checkpoints.load(ckpt, checkpoints.inference_model_config(ckpt, FLAGS.config) or cfg.model)
  logging.info("evaluating %s", ckpt.describe())
  out = FLAGS.out or FLAGS.workdir or str(ckpt.directory)
  mesh, load = trainer.data_mesh(), None
  if FLAGS.compiled_dir:
    loader = compiled.Loader(FLAGS.compiled_dir, compiled.expected(cfg, mesh, cfg.eval.batch_size, None), mesh)
    load = lambda canvas: loader.load("predict", canvas)
  source = sources.build_source(cfg.data, "val")
  evaluator.evaluate(model, variables, source, cfg.data, cfg.eval.batch_size, mesh, out, load=load)
  print(f"evaluated {ckpt.describe()}; wrote eval_metrics.json and eval_results.json to {out}")


if __name__ == "__main__":
  cli.run(main)
