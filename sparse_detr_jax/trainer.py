"""Training: the data-parallel train step, Orbax checkpoints with the data-iterator state, the loop.

The step is written per device with `jax.shard_map` over a `data` mesh axis spanning every device of
every host: each device computes the official losses on its slice (box count averaged over the
axis, losses.compute), the total is averaged over the axis, so the gradient is the global-batch
gradient; the state is replicated and donated.
"""

import contextlib
import dataclasses
import logging
import os
import pathlib
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sparse_detr_jax import checkpoints, convert, evaluator, loop, losses, metrics_writer, optim, visualize
from sparse_detr_jax import compiled as compiled_lib
from sparse_detr_jax import model as model_lib
from sparse_detr_jax import workdir as workdir_lib
from sparse_detr_jax.data import pipeline, sources

BATCH_KEYS = ("image", "padding_mask", "labels", "boxes", "box_valid")  # what the train step reads


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  constants: Any  # non-trained collections (frozen BatchNorm statistics)
  nonfinite_steps: jax.Array  # () int32: steps whose loss or gradient was non-finite (not applied)
  first_nonfinite: jax.Array  # () int32: the first such step, -1 if none

  @classmethod
  def create(cls, params: Any, opt_state: Any, rng: jax.Array, constants: Any) -> "TrainState":
    return cls(
      jnp.zeros((), jnp.int32), params, opt_state, rng, constants, jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32)
    )


def data_mesh() -> Mesh:
  """One `data` axis over every device of every host."""
  return Mesh(np.array(jax.devices()), ("data",))


def initial_variables(cfg: ml_collections.ConfigDict, model, rng: jax.Array) -> dict:
  """Official init, then the weights of `train.init_checkpoint` (any checkpoint `checkpoints.find` reads: official
  .pth, converted directory, training workdir or step) where set: every variable but the class heads when
  `model.num_classes` differs from the checkpoint's (those keep the official init), after checkpoints.check_model.
  Logs what was loaded and what was initialised."""
  t = cfg.train
  if t.backbone_checkpoint and cfg.model.backbone != "resnet50":
    raise ValueError(
      f"train.backbone_checkpoint: torchvision's ResNet-50 weights start a resnet50 model; this config's backbone "
      f"is {cfg.model.backbone}: start from an official Sparse DETR checkpoint with train.init_checkpoint instead"
    )
  if t.init_checkpoint:
    ckpt = checkpoints.find(t.init_checkpoint)
    what = f"train.init_checkpoint {t.init_checkpoint}"
    ignored = checkpoints.check_model(ckpt, cfg.model, what, allow_num_classes=True)
    if ignored:
      logging.info("%s: differs from the config where no weight changes: %s", what, "; ".join(ignored))
    _, loaded = checkpoints.load(ckpt, what=what)
  variables = model_lib.init_variables(model, rng)
  if t.init_checkpoint:
    flat, new = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(loaded)
    fresh = [k for k in flat if k not in new or new[k].shape != flat[k].shape]  # the class heads, if re-headed
    variables = traverse_util.unflatten_dict({**new, **{k: flat[k] for k in fresh}})
    logging.info(
      "%s: loaded %d of %d variable arrays; initialised %d%s",
      what,
      len(flat) - len(fresh),
      len(flat),
      len(fresh),
      f" (the class heads, for model.num_classes = {cfg.model.num_classes}; the checkpoint has "
      f"{ckpt.model_config.num_classes if ckpt.model_config else '?'})"
      if fresh
      else "",
    )
  elif t.backbone_checkpoint:
    variables = convert.load_torchvision_resnet50(t.backbone_checkpoint, variables)
    logging.info("train.backbone_checkpoint %s: the ResNet-50 weights loaded", t.backbone_checkpoint)
  return variables


def new_state(
  cfg: ml_collections.ConfigDict, variables: dict, global_batch: int, steps_per_epoch: int, rng: jax.Array
) -> tuple[TrainState, optax.GradientTransformation, dict]:
  """(step-0 state, optimiser, lr schedule per group) from variables {'params', ...constants}: the official
  optimiser (optim.make_optimizer) for this global batch and epoch length."""
  params = variables["params"]
  constants = {k: v for k, v in variables.items() if k != "params"}
  tx, schedules = optim.make_optimizer(cfg.train, cfg.model, params, global_batch, steps_per_epoch)
  return TrainState.create(params, tx.init(params), rng, constants), tx, schedules


def make_train_step(
  model, cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation, mesh: Mesh, schedules: dict
):
  """jitted (state, batch) -> (state, metrics); state donated.

  A non-finite loss or gradient norm leaves the parameters and optimiser state unchanged, counts the
  step in `state.nonfinite_steps` and records the first one in `state.first_nonfinite`, all on the
  device (the loop reads them only at log / checkpoint / eval steps). With `train.on_nonfinite =
  'stop'`, no update is applied after the first non-finite step either, so the state the loop stops
  with is the last good one."""
  stop = cfg.train.on_nonfinite == "stop"

  def per_device(state: TrainState, batch: dict):
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index("data"))
    targets = {"labels": batch["labels"], "boxes": batch["boxes"], "valid": batch["box_valid"]}

    def loss_fn(params):
      out = model.apply(
        {"params": params, **state.constants}, batch["image"], batch["padding_mask"], train=True, rngs={"dropout": rng}
      )
      with jax.named_scope("losses"):  # named scopes: benchmarks/profile_step.py attributes time by them
        ld = losses.compute(out, targets, cfg, axis_name="data")
      return jax.lax.pmean(losses.total(ld, cfg), "data"), ld

    (loss, ld), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    labels = optim.param_labels(grads, cfg.model.backbone, cfg.train.freeze_early_backbone)
    gnorm = optax.tree.norm(jax.tree.map(lambda g, l: g if l != "frozen" else jnp.zeros_like(g), grads, labels))
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    apply = ok & (state.first_nonfinite < 0) if stop else ok
    with jax.named_scope("optimizer"):  # the update and its non-finite guard (XLA fuses the two)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
      new = jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, state.replace(step=state.step + 1))
    new = new.replace(
      nonfinite_steps=state.nonfinite_steps + (~ok).astype(jnp.int32),
      first_nonfinite=jnp.where((state.first_nonfinite < 0) & ~ok, state.step + 1, state.first_nonfinite),
    )
    metrics = {k: jax.lax.pmean(v, "data") for k, v in ld.items()}
    metrics.update(
      total_loss=loss,
      grad_norm=gnorm,
      nonfinite=(~ok).astype(jnp.int32),
      **{f"lr/{k}": s(state.step) for k, s in schedules.items()},
    )
    return new, metrics

  step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=0)


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Orbax manager of WORKDIR/checkpoints (items `state` and `data`, the iterator state). Saves are
  asynchronous: `save` returns once the arrays are copied to host memory and the write goes on in the
  background; a step directory appears only when complete, so a kill mid-write leaves the previous one."""
  return ocp.CheckpointManager(
    pathlib.Path(workdir).absolute() / "checkpoints",
    options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
    item_names=("state", "data"),
  )


def write_pictures(
  writer: metrics_writer.MetricsWriter,
  step: int,
  model,
  state: TrainState,
  val_source,
  data_config: ml_collections.ConfigDict,
  names: dict[int, str],
) -> None:
  """TensorBoard pictures of the first val image: detections (named by the run's label map) and the kept tokens /
  DAM per level."""
  batch = pipeline.eval_dataset(val_source, data_config, 1)[0]
  variables = jax.tree.map(lambda x: x.addressable_data(0), {"params": state.params, **state.constants})
  for name, picture in visualize.batch_pictures(model, variables, batch, names).items():
    writer.image(step, f"pictures/{name}", picture)


@dataclasses.dataclass
class Schedule:
  global_batch: int
  steps_per_epoch: int
  total_steps: int


def schedule(cfg, train_source) -> Schedule:
  g = cfg.train.batch_size * jax.device_count()
  spe = pipeline.Planner(train_source.sizes, pipeline.data_spec(cfg.data), g, cfg.train.seed, True).batches_per_epoch
  total = cfg.train.max_steps or cfg.train.epochs * spe
  return Schedule(g, spe, total)


def _precompile(option: str) -> bool:
  if option not in ("auto", "always", "never"):
    raise ValueError(f"train.precompile: expected 'auto', 'always' or 'never', got {option!r}")
  return option == "always" or (option == "auto" and jax.default_backend() != "cpu")


def train(cfg: ml_collections.ConfigDict, workdir: str, compiled_dir: str | None = None) -> TrainState:
  """Train (resuming from the latest checkpoint in workdir), evaluating periodically and at the end.

  Steady-state steps do no device-to-host transfer: the host reads the device only at log, checkpoint,
  eval and picture steps, so it dispatches step N+1 and copies batch N+2 while step N runs.
  Checkpoints are written in the background. On SIGTERM (or, on
  a pod, JAX's preemption notice) every host saves at the same next step and `train` returns.
  compiled_dir: train steps saved by preflight --save_compiled, loaded instead of compiled where they match
  (sparse_detr_jax/compiled.py).
  """
  t = cfg.train
  # The data paths as absolute ones: evaluate.py --workdir and predict then work from any directory.
  for field in ("coco_dir", "tfds_data_dir"):
    if cfg.data.get(field):
      cfg.data[field] = os.path.abspath(os.path.expanduser(cfg.data[field]))
  # Everything that can be checked is checked before the workdir is claimed (config.json, labels.json written).
  workdir_lib.check(cfg, workdir)
  mesh = data_mesh()
  model = model_lib.build_model(cfg.model)
  train_source = sources.build_source(cfg.data, "train")
  sources.check_classes(train_source, cfg.model.num_classes)
  names = train_source.categories
  workdir_lib.check_labels(names, workdir, train_source.where)
  sch = schedule(cfg, train_source)
  loader = None
  if compiled_dir:
    want = compiled_lib.expected(cfg, mesh, t.batch_size, sch.steps_per_epoch)
    loader = compiled_lib.Loader(compiled_dir, want, mesh)
  val_source = (
    sources.build_source(cfg.data, "val") if (t.eval_every_steps or t.eval_at_end or t.picture_every_steps) else None
  )
  if val_source is not None and val_source.categories != names:
    logging.warning(
      "%s and %s list different categories; the model predicts the training set's (%s), evaluation scores the "
      "validation set's",
      train_source.where,
      val_source.where,
      ", ".join(f"{k}: {v}" for k, v in sorted(names.items())[:8]),
    )
  variables = initial_variables(cfg, model, jax.random.PRNGKey(t.seed))
  workdir_lib.record(cfg, workdir, names)
  state, tx, schedules = new_state(
    cfg, variables, sch.global_batch, sch.steps_per_epoch, jax.random.PRNGKey(t.seed + 1)
  )
  ds = pipeline.train_dataset(
    train_source, cfg.data, sch.global_batch, t.seed, sch.total_steps, jax.process_index(), jax.process_count()
  )
  with contextlib.ExitStack() as stack:  # closes worker processes, the checkpoint writer and the event files
    it = stack.enter_context(contextlib.closing(pipeline.iterate(ds, cfg.data.num_workers, cfg.data.prefetch)))
    mngr = stack.enter_context(contextlib.closing(checkpoint_manager(workdir, t.keep_checkpoints)))
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, P()))  # replicated: also the restore target
    if mngr.latest_step() is not None:
      restored = mngr.restore(
        mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore())
      )
      state = restored["state"]
      it.set_state(restored["data"])
      logging.info("resumed from %s at step %d", mngr.directory, int(state.step))
    writer = stack.enter_context(
      contextlib.closing(metrics_writer.MetricsWriter(workdir, enabled=jax.process_index() == 0))
    )
    watcher = stack.enter_context(loop.PreemptionWatcher())
    start = int(state.step)
    writer.text(start, "config", cfg.to_json_best_effort(indent=1))
    batches = loop.DevicePrefetch(it, mesh, BATCH_KEYS, size=2)
    load = (lambda canvas: loader.load("train", canvas)) if loader else None
    step_fn = loop.StepExecutables(make_train_step(model, cfg, tx, mesh, schedules), load=load)
    # skipped_images: images left out when the dataset was read (missing files) and samples that could not be
    # decoded (replaced by empty images, each time they come up); skipped_annotations: see sources.CocoSource.
    skipped, dropped, window_step, window_start = train_source.skipped_images, 0, start, time.time()
    for step in range(start + 1, sch.total_steps + 1):
      batch, host, data_state = next(batches)
      if step == start + 1 and _precompile(t.precompile):
        step_fn.compile_all(state, batch, pipeline.data_spec(cfg.data).buckets, t.compile_threads)
      skipped += int(host["skipped"].sum())
      truncated = int(host["truncated"].sum())
      if truncated and not dropped:
        logging.warning(
          "step %d: an image has more than data.max_boxes = %d boxes; the rest are dropped (raise "
          "--config.data.max_boxes to keep them; the count is the dropped_boxes metric)",
          step,
          cfg.data.max_boxes,
        )
      dropped += truncated
      preempted = watcher.reached(step)
      checkpoint = step % t.checkpoint_every == 0 or step == sch.total_steps or preempted
      log = step % t.log_every == 0 or step == sch.total_steps or step == start + 1 or preempted
      picture = bool(t.picture_every_steps) and step % t.picture_every_steps == 0
      evaluate = val_source is not None and (
        (t.eval_every_steps and step % t.eval_every_steps == 0) or (t.eval_at_end and step == sch.total_steps)
      )
      state, metrics = step_fn(state, batch)
      if not (checkpoint or log or picture or evaluate):
        continue  # a steady-state step: no device read, so the host runs ahead (tests/test_trainer.py checks)
      nonfinite_steps, first_nonfinite = (
        int(x) for x in jax.device_get((state.nonfinite_steps, state.first_nonfinite))
      )
      if first_nonfinite >= 0 and t.on_nonfinite == "stop":
        raise FloatingPointError(
          f"non-finite loss or gradient at step {first_nonfinite} (seen at step {step}); no update was applied "
          f"from it on and no checkpoint was written after it. Latest checkpoint: step {mngr.latest_step()} in "
          f"{mngr.directory}"
        )
      if log:
        metrics = jax.tree.map(float, jax.device_get(metrics))
        now = time.time()  # images/s over the steps since the last log line (the first includes compilation)
        rate = (step - window_step) * sch.global_batch / max(now - window_start, 1e-9)
        window_step, window_start = step, now
        metrics.update(
          images_per_second=rate,
          skipped_images=skipped,
          skipped_annotations=train_source.skipped_annotations,
          dropped_boxes=dropped,
          epoch=step / sch.steps_per_epoch,
          nonfinite_steps=nonfinite_steps,
        )
        writer.scalars(step, metrics)
        eta = (sch.total_steps - step) * sch.global_batch / max(rate, 1e-9)
        logging.info(
          "step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %s",
          step,
          sch.total_steps,
          metrics["total_loss"],
          metrics["lr/base"],
          metrics["grad_norm"],
          # The first step's time is mostly compilation: no rate or ETA from it.
          ("(loaded and ran)" if step_fn.loaded else "(compiled and ran)")
          if step == start + 1
          else f"{rate:.1f} img/s  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
        )
      if checkpoint:  # the data state read with this step's batch: a resume starts at the next batch
        mngr.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
          force=True,
        )
        logging.info(
          "step %d: checkpoint %s (written in the background)", step, os.path.join(mngr.directory, str(step))
        )
      if preempted:
        mngr.wait_until_finished()
        logging.warning(
          "preempted: stopped after step %d of %d with a checkpoint at %s; rerun the same command to resume",
          step,
          sch.total_steps,
          os.path.join(mngr.directory, str(step)),
        )
        break
      if picture and jax.process_index() == 0:
        write_pictures(writer, step, model, state, val_source, cfg.data, names)
      if evaluate:
        stats = evaluator.evaluate(
          model,
          {"params": state.params, **state.constants},
          val_source,
          cfg.data,
          cfg.eval.batch_size,
          mesh,
          workdir,
          tag=f"eval_step{step}",
        )
        writer.scalars(step, {f"eval/{k}": v for k, v in stats.items()})
  if skipped:
    logging.warning(
      "%d training images were left out (missing files) or replaced by empty images (could not be decoded)", skipped
    )
  if dropped:
    logging.warning("%d boxes over data.max_boxes = %d were dropped from training images", dropped, cfg.data.max_boxes)
  if loader:
    logging.info(
      "--compiled_dir %s: %d train steps loaded, %d compiled", compiled_dir, step_fn.loaded, len(step_fn.seconds)
    )
  if int(state.step) >= sch.total_steps:
    final = os.path.join(os.path.abspath(workdir), "checkpoints", str(sch.total_steps))
    logging.info("finished: %d steps; the final checkpoint is %s", sch.total_steps, final)
  return state
