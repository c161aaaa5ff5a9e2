"""costmodel: ops attributed to parts of the step by their op_name, through JAX's transformation wrappers; XLA:TPU's
per-instruction cycle estimates summed through loops; matrix-product FLOPs counted through scans."""

import jax
import jax.numpy as jnp

from sparse_detr_jax import costmodel


def test_ops_are_attributed_through_transformations():
  part = costmodel.part
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
  assert part("jit(per_device)/transpose(jvp(SparseDETR))/psum", "all-reduce-start") == "all-reduce"
  assert part("", "copy") == "unattributed"
  assert costmodel.direction(sampling) == "backward" and costmodel.direction(linear) == "forward"


SAMPLING = "jit(f)/jvp(SparseDETR)/encoder_layers_0/self_attn"
# A scheduled TPU module in the shape XLA:TPU prints it: a scanned layer (i < 6) holding a loop XLA made (u32 i < 4)
# whose instructions have no metadata, a data-dependent loop, and instructions outside any loop.
HLO = f"""HloModule jit_f, is_scheduled=true

%inner_cond (p: (u32[], f32[8])) -> pred[] {{
  %c4 = u32[] constant(4)
  %p = (u32[], f32[8]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c4), direction=LT
}}

%inner_body (p: (u32[], f32[8])) -> (u32[], f32[8]) {{
  %p = (u32[], f32[8]) parameter(0)
  %relayout = f32[8]{{0}} reshape(%x), backend_config={{"window_config":{{"estimated_cycles":"300"}}}}
  ROOT %t = (u32[], f32[8]) tuple(%i, %relayout)
}}

%layer_cond (p: (s32[], f32[8])) -> pred[] {{
  %c6 = s32[]{{:T(128)}} constant(6)
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c6), direction=LT, metadata={{op_name="jit(f)/while/cond/lt"}}
}}

%layer_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {{
  %p = (s32[], f32[8]) parameter(0)
  %gather_fusion = f32[8]{{0}} fusion(%x), kind=kCustom, calls=%g, metadata={{op_name="{SAMPLING}/gather"}}, backend_config={{"window_config":{{"estimated_cycles":"1500"}}}}
  %w = (u32[], f32[8]) while(%t0), condition=%inner_cond, body=%inner_body
  %scatter_fusion = f32[8]{{0}} fusion(%x), kind=kCustom, calls=%s, metadata={{op_name="transpose(jvp({SAMPLING}))/scatter-add"}}
  ROOT %t = (s32[], f32[8]) tuple(%i, %gather_fusion)
}}

%solve_cond (p: (s32[], s32[])) -> pred[] {{
  %p = (s32[], s32[]) parameter(0)
  %a = s32[] get-tuple-element(%p), index=0
  %b = s32[] get-tuple-element(%p), index=1
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}}

%solve_body (p: (s32[], s32[])) -> (s32[], s32[]) {{
  %p = (s32[], s32[]) parameter(0)
  %step = s32[] add(%a, %b), metadata={{op_name="jit(f)/jvp(losses)/matcher/while/body/add"}}, backend_config={{"estimated_cycles":"30"}}
  ROOT %t = (s32[], s32[]) tuple(%step, %b)
}}

ENTRY %main (x: f32[8]) -> f32[8] {{
  %conv = f32[8]{{0}} convolution(%x, %k), metadata={{op_name="jit(f)/jvp(SparseDETR)/backbone/layer2_0/conv2/conv"}}, backend_config={{"window_config":{{"estimated_cycles":"3000"}}}}
  %loop = (s32[]{{:T(128)}}, f32[8]{{0}}) while(%t1), condition=%layer_cond, body=%layer_body, metadata={{op_name="{SAMPLING}/while"}}
  %solve = (s32[], s32[]) while(%t2), condition=%solve_cond, body=%solve_body, metadata={{op_name="jit(f)/jvp(losses)/matcher/while"}}
  %ar = (f32[8]{{0}}, f32[4]{{0}}) all-reduce-start(%conv, %y), to_apply=%add, backend_config={{"estimated_cycles":"600"}}
  %cc = f32[8]{{0}} custom-call(%x), custom_call_target="ConcatBitcast"
  %sc = f32[8]{{0}} fusion(%x), kind=kCustom, calls=%o, metadata={{op_name="jit(f)/jvp(losses)/gather"}}, backend_config={{"window_config":{{"estimated_cycles":"9223372036854775807"}}}}
  ROOT %out = f32[8]{{0}} add(%conv, %x)
}}
"""  # noqa: E501 (HLO lines as XLA prints them)


def test_loops_run_their_bodies_trip_count_times():
  ops = costmodel.parse(HLO)
  assert ops["loop"].loop == ("layer_body", 6) and ops["w"].loop == ("inner_body", 4)
  assert ops["solve"].loop == ("solve_body", None)  # data-dependent: no constant bound
  assert ops["ar"].opcode == "all-reduce-start" and ops["cc"].opcode == "custom-call:ConcatBitcast"
  runs, unknown = costmodel.executions(ops)
  assert (runs["main"], runs["layer_body"], runs["inner_body"], runs["solve_body"], unknown) == (1, 6, 24, 1, 1)
  # XLA's own loop inside the sampling has no metadata: it is the sampling's, named by the loops around it.
  assert costmodel.part(ops["relayout"].op_name, ops["relayout"].opcode) == "deformable sampling"


def test_the_estimate_sums_cycles_through_loops_by_part():
  est = costmodel.estimate(HLO, clock_ghz=1e-6)  # 1 kHz: a cycle is a millisecond
  assert {k: round(v * 1e3, 6) for k, v in est.seconds.items()} == {
    ("backbone convolutions", "forward"): 3000,
    ("deformable sampling", "forward"): 6 * 1500 + 24 * 300,
    ("matcher", "forward"): 30,
    ("all-reduce", "forward"): 600,
  }
  assert est.instructions[("deformable sampling", "forward")] == 2 and est.unknown_trip_loops == 1
  # Custom fusions without cycles (the layer's scatter, 6 times) and int64-max cycles (an offloaded gather): counted
  # apart, never summed.
  assert est.unpriced == {("deformable sampling", "backward"): 6, ("losses", "forward"): 1}
  assert round(est.total_s * 1e3, 6) == 3000 + 9000 + 7200 + 30 + 600
  assert round(est.by_part()["deformable sampling"] * 1e3, 6) == 16200


def test_matmul_flops_count_products_and_convolutions_through_scans():
  def f(x, ws, k, img):
    y, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)  # 5 x (4, 8) @ (8, 8)
    out = jax.lax.conv_general_dilated(img, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.sum() + out.sum()

  args = (jnp.ones((4, 8)), jnp.ones((5, 8, 8)), jnp.ones((3, 3, 2, 6)), jnp.ones((1, 5, 7, 2)))
  expected = 5 * 2 * 4 * 8 * 8 + 2 * (5 * 7 * 6) * (3 * 3 * 2)
  assert costmodel.matmul_flops(jax.make_jaxpr(f)(*args)) == expected
  grad = jax.make_jaxpr(jax.grad(lambda ws: f(args[0], ws, *args[2:])))(args[1])
  # The backward of each step: the carry's and the weight's cotangents, a product each (the reversed scan).
  assert costmodel.matmul_flops(grad) == expected + 2 * 5 * 2 * 4 * 8 * 8
