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
