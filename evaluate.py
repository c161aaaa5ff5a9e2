"""COCO evaluation: `python evaluate.py [--config configs/NAME.py] (--workdir DIR | --checkpoint PATH)`.

--workdir: the latest checkpoint a training run wrote there, with the run's config (WORKDIR/config.json) unless
--config is given; results go to the same workdir.
--checkpoint: a checkpoint step directory (DIR/checkpoints/STEP), an official Sparse DETR .pth or a directory
written by sparse_detr_jax.convert (their architecture comes with them; the config supplies data and eval settings).
Prints the standard 12-number COCO table and writes eval_results.json / eval_metrics.json
(with per-class AP) to --workdir, else the checkpoint's workdir or the directory holding it.
"""

from absl import flags
from ml_collections import config_flags

from sparse_detr_jax import cli, evaluator, hostmem, logs, loop, trainer, xla_flags
from sparse_detr_jax.data import sources

config_flags.DEFINE_config_file("config", None, "a config file from configs/", lock_config=True)
flags.DEFINE_string("workdir", None, "a training workdir: evaluate its latest checkpoint")
flags.DEFINE_string("checkpoint", None, "checkpoint step directory, official .pth or converted directory")
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
  model, variables, cfg, found = trainer.load_for_inference(FLAGS.checkpoint or FLAGS.workdir, FLAGS.config)
  if cfg is None:
    cli.usage_error(f"--config: needed with --checkpoint {FLAGS.checkpoint}, which carries no data or eval settings")
  evaluator.evaluate(
    model,
    variables,
    sources.build_source(cfg.data, "val"),
    cfg.data,
    cfg.eval.batch_size,
    trainer.data_mesh(),
    FLAGS.workdir or found,
    tag="eval",
  )


if __name__ == "__main__":
  cli.run(main)
