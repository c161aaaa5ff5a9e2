"""benchmarks/profile_step.py: the profiled forward runs and its ops are attributed to parts of the model."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import profile_step

from sparse_detr_jax import costmodel


def test_forward_profile_runs_the_model_and_attributes_its_ops():
  """--forward: the step is the model's inference forward, and its sampling and linear layers are told apart."""
  step, variables, inputs = profile_step.random_forward(str(ROOT / "configs" / "shapes_tiny.py"), (64, 64), 1)
  ops = costmodel.hlo_ops(step.lower(variables, inputs).compile().as_text())
  parts = {costmodel.part(op_name, opcode) for opcode, op_name in ops.values()}
  assert {"deformable sampling", "model, other"} <= parts
  _, outputs = step(variables, inputs)
  assert outputs["pred_logits"].shape[0] == 1 and outputs["pred_boxes"].shape[-1] == 4
