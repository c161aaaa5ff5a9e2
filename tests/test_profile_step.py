"""benchmarks/profile_step.py: ops are attributed to parts of the step by their op_name, through JAX's
transformation wrappers (forward, backward, vmapped)."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import profile_step


def test_ops_are_attributed_through_transformations():
  part = profile_step.part
  assert part("jit(per_device)/jvp(losses)/add", "add") == "losses"
  assert part("jit(per_device)/transpose(jvp(losses))/mul", "multiply") == "losses"
  assert part("jit(per_device)/jvp(losses)/matcher/vmap()/while/body/gather", "gather") == "matcher"
  assert part("jit(per_device)/optimizer/add", "add") == "optimizer"
  sampling = "jit(per_device)/transpose(jvp(SparseDETR))/encoder_layers_3/self_attn/while/body/closed_call"
  assert part(sampling, "transpose_copy_fusion.8") == "deformable sampling"
  linear = "jit(per_device)/jvp(SparseDETR)/encoder_layers_3/self_attn/value_proj/dot_general"
  assert part(linear, "ynn_fusion.1") == "model, other"
  assert part("jit(per_device)/jvp(SparseDETR)/backbone/layer1_0/conv1/dot_general", "dot") == "backbone convolutions"
  assert part("jit(per_device)/jvp(SparseDETR)/backbone/layer1_0/bn1/mul", "multiply") == "backbone, other"
  assert part("jit(per_device)/jvp(SparseDETR)/decoder_layers_0/linear1/dot_general", "dot") == "model, other"
  assert part("jit(per_device)/isfinite", "is-finite") == "rest of the step"
  assert part("", "copy") == "unattributed"


def test_forward_profile_runs_the_model_and_attributes_its_ops():
  """--forward: the step is the model's inference forward, and its sampling and linear layers are told apart."""
  step, variables, inputs = profile_step.random_forward(str(ROOT / "configs" / "shapes_tiny.py"), (64, 64), 1)
  ops = profile_step.hlo_ops(step.lower(variables, inputs).compile().as_text())
  parts = {profile_step.part(op_name, opcode) for opcode, op_name in ops.values()}
  assert {"deformable sampling", "model, other"} <= parts
  _, outputs = step(variables, inputs)
  assert outputs["pred_logits"].shape[0] == 1 and outputs["pred_boxes"].shape[-1] == 4
