"""Train Sparse DETR: `python train.py --config configs/NAME.py --workdir DIR [--config.train.batch_size=4 ...]`.

Rerunning with the same workdir resumes from its latest checkpoint (the workdir's config.json must
match in every field that matters). Multi-host: run one process per host with `--coordinator_address
HOST:PORT --num_processes N --process_id I`, or `--multihost` where jax.distributed.initialize() finds
the cluster itself (TPU pods, SLURM).

Preemption: on SIGTERM (one host) or JAX's preemption notice (any host of a pod), every host saves a
checkpoint at the same next step and exits with status 0; rerunning the same command resumes there.
"""

import jax
from absl import flags, logging
from ml_collections import config_flags

from sparse_detr_jax import cli, hostmem, logs, loop, trainer, xla_flags
from sparse_detr_jax import config as config_lib

config_flags.DEFINE_config_file("config", None, "a config file from configs/", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard events and eval results go here")
flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() with its cluster auto-detection")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (explicit multi-process set-up)")
flags.DEFINE_integer("num_processes", 1, "with --coordinator_address")
flags.DEFINE_integer("process_id", 0, "with --coordinator_address")
flags.DEFINE_string(
  "compilation_cache_dir",
  loop.DEFAULT_CACHE_DIR,
  "JAX's persistent compilation cache ('' = off): reruns and resumed runs load compiled steps",
)
flags.DEFINE_bool(
  "retain_host_memory",
  True,
  "keep freed host memory for reuse (sparse_detr_jax/hostmem.py: faster steps on a CPU; the process keeps its peak"
  " resident size)",
)
flags.DEFINE_string(
  "compiled_dir",
  None,
  "train steps saved by `preflight --save_compiled DIR`: loaded instead of compiled where they match this run (a"
  " saved program is as trusted as code: loading it unpickles it)",
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def init_distributed() -> None:
  """jax.distributed for multi-host runs (CPU processes exchange collectives over gloo)."""
  if FLAGS.coordinator_address or FLAGS.multihost:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if FLAGS.coordinator_address:
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    else:
      jax.distributed.initialize()


def main(argv):
  del argv
  logs.quiet_library_logs()
  if FLAGS.retain_host_memory:
    hostmem.retain_freed_memory()
  xla_flags.set_gpu_flags()
  init_distributed()
  loop.enable_compilation_cache(FLAGS.compilation_cache_dir)
  config_lib.validate(FLAGS.config.model)
  logging.info("%d processes, %d devices (%d local)", jax.process_count(), jax.device_count(), jax.local_device_count())
  # A workdir.ConfigMismatch says what to do: one message (cli.run).
  trainer.train(FLAGS.config, FLAGS.workdir, FLAGS.compiled_dir)


if __name__ == "__main__":
  cli.run(main)
