"""A traced JAX function -> an ONNX graph of standard operators (opset 18): what `export --format onnx` writes.

    places = onnx_export.write_weights(variables, directory / "weights.bin")
    model = onnx_export.convert(fn, variables, specs, input_names, output_names, ("weights.bin", places))

The function is traced to a jaxpr at the arguments' static shapes and each primitive becomes one or a few ONNX
operators: the calls (jit, custom_jvp/vjp, remat) are inlined, scans unrolled, gathers and scatters (row gathers,
`.at[].set/add/max` with batching dimensions, out-of-range `mode='drop'` writes) written as GatherND / ScatterND
with their indices made explicit, convolutions and max-pooling moved to ONNX's channels-first layout and back. A
primitive outside this set is a NotImplementedError naming it: the converter never guesses.

Weights (the first argument's leaves) are stored once, outside the graphs, in an external-data file that every
canvas's graph points into; the other arguments are the graph's inputs.
"""

import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import onnx
from jax import lax
from jax.extend import core as jcore
from onnx import TensorProto, helper, numpy_helper

OPSET = 18  # ScatterND's max reduction and ReduceMax's axes input need 18

_ELEMENTWISE = {
  "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min", "pow": "Pow",
  "neg": "Neg", "sign": "Sign", "floor": "Floor", "ceil": "Ceil", "sqrt": "Sqrt", "exp": "Exp", "log": "Log",
  "sin": "Sin", "cos": "Cos", "abs": "Abs", "logistic": "Sigmoid", "tanh": "Tanh", "erf": "Erf",
  "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual",
  "stop_gradient": "Identity", "copy": "Identity",
}  # fmt: skip
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin"}
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr"}  # fmt: skip


def _onnx_type(dtype: Any) -> int:
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class _Graph:
  """The ONNX nodes, initializers and names of one conversion."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self.count = 0
    self.constants: dict[tuple, str] = {}

  def name(self, hint: str = "t") -> str:
    self.count += 1
    return f"{hint}_{self.count}"

  def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs: Any) -> Any:
    outs = [self.name(op_type.lower()) for _ in range(n_out)]
    self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
    return outs[0] if n_out == 1 else outs

  def const(self, value: Any, dtype: Any = None) -> str:
    array = np.asarray(value, dtype)
    key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
    if key is not None and key in self.constants:
      return self.constants[key]
    name = self.name("const")
    self.initializers.append(numpy_helper.from_array(array, name))
    if key is not None:
      self.constants[key] = name
    return name

  def i64(self, values: Sequence[int]) -> str:
    return self.const(np.asarray(values, np.int64))

  def cast(self, x: str, dtype: Any) -> str:
    return self.op("Cast", [x], to=_onnx_type(dtype))

  def reshape(self, x: str, shape: Sequence[int]) -> str:
    return self.op("Reshape", [x, self.i64(shape)])


class _Converter:
  def __init__(self, graph: _Graph):
    self.g = graph
    self.platform_index: dict[str, int] = {}  # constants holding `platform_index`'s value: the CPU branch

  def read(self, env: dict, v: Any) -> str:
    if isinstance(v, jcore.Literal):
      return self.g.const(np.asarray(v.val, v.aval.dtype))
    return env[v]

  def jaxpr(self, jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[str]) -> list[str]:
    env: dict = {}
    for v, c in zip(jaxpr.constvars, consts, strict=True):
      env[v] = c if isinstance(c, str) else self.g.const(np.asarray(c))
    for v, a in zip(jaxpr.invars, args, strict=True):
      env[v] = a
    for eqn in jaxpr.eqns:
      ins = [self.read(env, v) for v in eqn.invars]
      outs = self.eqn(eqn, ins)
      for v, o in zip(eqn.outvars, outs, strict=True):
        if not isinstance(v, jcore.DropVar):
          env[v] = o
    return [self.read(env, v) for v in jaxpr.outvars]

  def eqn(self, eqn: Any, ins: list[str]) -> list[str]:
    name, p = eqn.primitive.name, eqn.params
    in_avals = [v.aval for v in eqn.invars]
    out_avals = [v.aval for v in eqn.outvars]
    g = self.g
    if name in _CALLS:
      sub = p[_CALLS[name]]
      if isinstance(sub, jcore.ClosedJaxpr):
        return self.jaxpr(sub.jaxpr, sub.consts, ins)
      return self.jaxpr(sub, [], ins)
    if name == "scan":
      return self.scan(p, ins, in_avals)
    if name == "platform_index":  # lax.platform_dependent: ONNX graphs take the CPU (default) branch
      platforms = list(p["platforms"])  # one tuple of names per branch; None: the default branch
      cpu = [i for i, names in enumerate(platforms) if names is not None and "cpu" in names]
      out = g.const(np.int32(cpu[0] if cpu else platforms.index(None)))
      self.platform_index[out] = cpu[0] if cpu else platforms.index(None)
      return [out]
    if name == "cond" and ins[0] in self.platform_index:
      branch = p["branches"][self.platform_index[ins[0]]]
      return self.jaxpr(branch.jaxpr, branch.consts, ins[1:])
    method = getattr(self, f"p_{name.replace('-', '_')}", None)
    if method is not None:
      out = method(p, ins, in_avals, out_avals)
      return out if isinstance(out, list) else [out]
    if name in _ELEMENTWISE:
      return [g.op(_ELEMENTWISE[name], ins)]
    if name in _REDUCE:
      return [g.op(_REDUCE[name], [ins[0], g.i64(p["axes"])], keepdims=0)]
    raise NotImplementedError(f"ONNX export: the JAX primitive {name!r} has no conversion ({eqn})"[:400])

  # Elementwise primitives with a twist.
  def p_ne(self, p, ins, in_avals, out_avals):
    return self.g.op("Not", [self.g.op("Equal", ins)])

  def p_not(self, p, ins, in_avals, out_avals):
    return self.g.op("Not" if in_avals[0].dtype == np.bool_ else "BitwiseNot", ins)

  def p_and(self, p, ins, in_avals, out_avals):
    return self.g.op("And" if in_avals[0].dtype == np.bool_ else "BitwiseAnd", ins)

  def p_or(self, p, ins, in_avals, out_avals):
    return self.g.op("Or" if in_avals[0].dtype == np.bool_ else "BitwiseOr", ins)

  def p_rem(self, p, ins, in_avals, out_avals):
    return self.g.op("Mod", ins, fmod=1)  # C's fmod: the sign of the dividend, as lax.rem

  def p_rsqrt(self, p, ins, in_avals, out_avals):
    return self.g.op("Reciprocal", [self.g.op("Sqrt", ins)])

  def p_square(self, p, ins, in_avals, out_avals):
    return self.g.op("Mul", [ins[0], ins[0]])

  def p_integer_pow(self, p, ins, in_avals, out_avals):
    return self.g.op("Pow", [ins[0], self.g.const(p["y"], in_avals[0].dtype)])

  def p_erfc(self, p, ins, in_avals, out_avals):
    return self.g.op("Sub", [self.g.const(1, in_avals[0].dtype), self.g.op("Erf", ins)])

  def p_round(self, p, ins, in_avals, out_avals):
    if int(p["rounding_method"]) == 1:  # to nearest even: ONNX's Round
      return self.g.op("Round", ins)
    g = self.g  # away from zero: sign(x) * floor(|x| + 0.5)
    half = g.const(0.5, in_avals[0].dtype)
    return g.op("Mul", [g.op("Sign", ins), g.op("Floor", [g.op("Add", [g.op("Abs", ins), half])])])

  def p_convert_element_type(self, p, ins, in_avals, out_avals):
    return self.g.cast(ins[0], p["new_dtype"])

  def p_select_n(self, p, ins, in_avals, out_avals):
    g = self.g
    pred, cases = ins[0], ins[1:]
    if len(cases) == 1:
      return cases[0]
    if in_avals[0].dtype == np.bool_:
      return g.op("Where", [pred, cases[1], cases[0]])
    out = cases[-1]
    for i in range(len(cases) - 2, -1, -1):  # integer predicate: case i where pred == i
      out = g.op("Where", [g.op("Equal", [pred, g.const(i, in_avals[0].dtype)]), cases[i], out])
    return out

  def p_clamp(self, p, ins, in_avals, out_avals):
    lo, x, hi = ins
    return self.g.op("Min", [self.g.op("Max", [x, lo]), hi])

  # Shapes.
  def p_broadcast_in_dim(self, p, ins, in_avals, out_avals):
    shape = [1] * len(p["shape"])
    for src, dst in enumerate(p["broadcast_dimensions"]):
      shape[dst] = in_avals[0].shape[src]
    x = self.g.reshape(ins[0], shape) if tuple(shape) != tuple(in_avals[0].shape) else ins[0]
    return self.g.op("Expand", [x, self.g.i64(p["shape"])])

  def p_reshape(self, p, ins, in_avals, out_avals):
    return self.g.reshape(ins[0], out_avals[0].shape)

  p_squeeze = p_reshape
  p_expand_dims = p_reshape

  def p_transpose(self, p, ins, in_avals, out_avals):
    return self.g.op("Transpose", ins, perm=list(p["permutation"]))

  def p_slice(self, p, ins, in_avals, out_avals):
    g = self.g
    n = len(p["start_indices"])
    steps = p["strides"] or (1,) * n
    return g.op("Slice", [ins[0], g.i64(p["start_indices"]), g.i64(p["limit_indices"]), g.i64(range(n)), g.i64(steps)])

  def p_concatenate(self, p, ins, in_avals, out_avals):
    return self.g.op("Concat", ins, axis=int(p["dimension"]))

  def p_stack(self, p, ins, in_avals, out_avals):
    axes = self.g.i64([p["axis"]])
    return self.g.op("Concat", [self.g.op("Unsqueeze", [x, axes]) for x in ins], axis=int(p["axis"]))

  def p_pad(self, p, ins, in_avals, out_avals):
    g = self.g
    config = [(int(lo), int(hi), int(mid)) for lo, hi, mid in p["padding_config"]]
    if any(mid for _, _, mid in config):
      raise NotImplementedError("ONNX export: pad with interior padding")
    pads = [max(lo, 0) for lo, _, _ in config] + [max(hi, 0) for _, hi, _ in config]
    x = g.op("Pad", [ins[0], g.i64(pads), ins[1]], mode="constant")
    if any(lo < 0 or hi < 0 for lo, hi, _ in config):  # negative padding crops
      dims = [d + max(lo, 0) + max(hi, 0) for d, (lo, hi, _) in zip(in_avals[0].shape, config, strict=True)]
      starts = [max(-lo, 0) for lo, _, _ in config]
      ends = [d - max(-hi, 0) for d, (_, hi, _) in zip(dims, config, strict=True)]
      x = g.op("Slice", [x, g.i64(starts), g.i64(ends), g.i64(range(len(dims)))])
    return x

  def p_iota(self, p, ins, in_avals, out_avals):
    shape, dim = tuple(p["shape"]), int(p["dimension"])
    values = np.arange(shape[dim], dtype=p["dtype"]).reshape([-1 if i == dim else 1 for i in range(len(shape))])
    return self.g.const(np.broadcast_to(values, shape).copy())

  # Reductions and scans.
  def p_reduce_and(self, p, ins, in_avals, out_avals):
    g = self.g
    return g.cast(g.op("ReduceMin", [g.cast(ins[0], np.int32), g.i64(p["axes"])], keepdims=0), np.bool_)

  def p_reduce_or(self, p, ins, in_avals, out_avals):
    g = self.g
    return g.cast(g.op("ReduceMax", [g.cast(ins[0], np.int32), g.i64(p["axes"])], keepdims=0), np.bool_)

  def p_argmax(self, p, ins, in_avals, out_avals):
    (axis,) = p["axes"]
    return self.g.cast(self.g.op("ArgMax", ins, axis=int(axis), keepdims=0, select_last_index=0), p["index_dtype"])

  def p_cumsum(self, p, ins, in_avals, out_avals):
    return self.g.op("CumSum", [ins[0], self.g.const(np.int64(p["axis"]))], reverse=int(p["reverse"]))

  def p_top_k(self, p, ins, in_avals, out_avals):
    g = self.g
    axis = int(p.get("axis", -1))
    values, indices = g.op("TopK", [ins[0], g.i64([p["k"]])], n_out=2, axis=axis, largest=1, sorted=1)
    return [values, g.cast(indices, out_avals[1].dtype)]

  def p_reduce_window_max(self, p, ins, in_avals, out_avals):
    """Max-pooling over the spatial dims of an NHWC (or any layout whose window is 1 on two dims) operand."""
    g = self.g
    window, strides = p["window_dimensions"], p["window_strides"]
    if any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
      raise NotImplementedError("ONNX export: dilated reduce_window_max")
    spatial = [i for i, w in enumerate(window) if w != 1 or strides[i] != 1 or p["padding"][i] != (0, 0)]
    others = [i for i in range(len(window)) if i not in spatial]
    if len(others) != 2:
      raise NotImplementedError(f"ONNX export: reduce_window_max with window {window}")
    perm = others + spatial  # (N, C, spatial...)
    x = g.op("Transpose", ins, perm=perm)
    pads = [int(p["padding"][i][0]) for i in spatial] + [int(p["padding"][i][1]) for i in spatial]
    kernel, step = [window[i] for i in spatial], [strides[i] for i in spatial]
    y = g.op("MaxPool", [x], kernel_shape=kernel, strides=step, pads=pads)
    return g.op("Transpose", [y], perm=list(np.argsort(perm)))

  def scan(self, p, ins, in_avals) -> list[str]:
    """lax.scan unrolled: its length is static."""
    g = self.g
    body, n_consts, n_carry, length = p["jaxpr"], p["num_consts"], p["num_carry"], p["length"]
    consts, carry, xs = ins[:n_consts], ins[n_consts : n_consts + n_carry], ins[n_consts + n_carry :]
    ys: list[list[str]] = []
    for step in range(length):
      i = length - 1 - step if p["reverse"] else step
      x_i = [g.op("Gather", [x, g.const(np.int64(i))], axis=0) for x in xs]
      outs = self.jaxpr(body.jaxpr, [*body.consts], [*consts, *carry, *x_i])
      carry, y = outs[:n_carry], outs[n_carry:]
      ys.append(y)
    if p["reverse"]:
      ys.reverse()
    zero = g.i64([0])
    stacked = [g.op("Concat", [g.op("Unsqueeze", [y[k], zero]) for y in ys], axis=0) for k in range(len(ys[0]))]
    return [*carry, *stacked]

  # Products.
  def p_dot_general(self, p, ins, in_avals, out_avals):
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    a, b = in_avals
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    la = [next(letters) for _ in range(a.ndim)]
    ra = [next(letters) for _ in range(b.ndim)]
    for i, j in zip((*lc, *lb), (*rc, *rb), strict=True):
      ra[j] = la[i]
    out = [la[i] for i in lb] + [la[i] for i in range(a.ndim) if i not in (*lc, *lb)]
    out += [ra[j] for j in range(b.ndim) if j not in (*rc, *rb)]
    x, y = ins
    if a.dtype != out_avals[0].dtype:  # integer or mixed products: compute in the output type
      x, y = self.g.cast(x, out_avals[0].dtype), self.g.cast(y, out_avals[0].dtype)
    return self.g.op("Einsum", [x, y], equation=f"{''.join(la)},{''.join(ra)}->{''.join(out)}")

  def p_conv_general_dilated(self, p, ins, in_avals, out_avals):
    g = self.g
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
      raise NotImplementedError("ONNX export: transposed or batch-grouped convolutions")
    x = g.op("Transpose", [ins[0]], perm=list(lhs_spec))  # (N, C, spatial...)
    w = g.op("Transpose", [ins[1]], perm=list(rhs_spec))  # (O, I, spatial...)
    pads = [int(lo) for lo, _ in p["padding"]] + [int(hi) for _, hi in p["padding"]]
    y = g.op(
      "Conv", [x, w], strides=list(p["window_strides"]), pads=pads, dilations=list(p["rhs_dilation"]),
      group=int(p["feature_group_count"]),
    )  # fmt: skip
    return g.op("Transpose", [y], perm=list(np.argsort(out_spec)))

  # Gathers and scatters.
  def _full_indices(self, idx: str, idx_shape: tuple, batch_operand: Sequence[int], batch_idx: Sequence[int],
                    operand_shape: tuple, index_map: Sequence[int]) -> tuple[str, list[int], str]:  # fmt: skip
    """Indices (..., k) into the operand's batching dims then `index_map` dims: (index tuples int64 (..., b + k),
    the operand permutation that puts those dims first, a bool (...) mask of the tuples in range)."""
    g = self.g
    idx = g.cast(idx, np.int64)
    n = len(idx_shape) - 1  # the index vector is the last dim
    parts = []
    for ib in batch_idx:  # the batch position of each tuple (paired with batch_operand), as an index
      coords = np.arange(idx_shape[ib], dtype=np.int64).reshape([-1 if d == ib else 1 for d in range(n)] + [1])
      parts.append(g.op("Expand", [g.const(coords), g.i64([*idx_shape[:-1], 1])]))
    full = g.op("Concat", [*parts, idx], axis=-1) if parts else idx
    dims = [*batch_operand, *index_map]
    limits = g.const(np.asarray([operand_shape[d] for d in dims], np.int64))
    ok = g.op("And", [g.op("GreaterOrEqual", [full, g.i64([0])]), g.op("Less", [full, limits])])
    ok = g.cast(g.op("ReduceMin", [g.cast(ok, np.int32), g.i64([-1])], keepdims=0), np.bool_)
    perm = dims + [d for d in range(len(operand_shape)) if d not in dims]
    return full, perm, ok

  def p_gather(self, p, ins, in_avals, out_avals):
    """XLA gathers that take whole rows: every indexed dim is collapsed (slice size 1), every other dim is kept
    whole or is a batching dim. GatherND on the operand with its batching, then indexed dims put first."""
    g = self.g
    dn = p["dimension_numbers"]
    operand, idx = in_avals
    index_map = [int(d) for d in dn.start_index_map]
    batch_op = [int(d) for d in dn.operand_batching_dims]
    batch_idx = [int(d) for d in dn.start_indices_batching_dims]
    sizes = p["slice_sizes"]
    whole = [d for d in range(operand.ndim) if d not in (*index_map, *batch_op)]
    if sorted(int(d) for d in dn.collapsed_slice_dims) != sorted(index_map) or any(
      sizes[d] != operand.shape[d] for d in whole
    ):
      raise NotImplementedError(f"ONNX export: gather {dn} with slice sizes {sizes}")
    full, perm, ok = self._full_indices(ins[1], idx.shape, batch_op, batch_idx, operand.shape, index_map)
    data = g.op("Transpose", [ins[0]], perm=perm) if perm != list(range(operand.ndim)) else ins[0]
    limits = g.const(np.asarray([operand.shape[d] - 1 for d in (*batch_op, *index_map)], np.int64))
    clamped = g.op("Min", [g.op("Max", [full, g.i64([0])]), limits])
    rows = g.op("GatherND", [data, clamped])  # (idx batch dims..., whole dims...)
    # XLA's output: offset dims (the whole dims, in order) at dn.offset_dims, the index batch dims elsewhere
    n_batch = idx.ndim - 1
    out_ndim = out_avals[0].ndim
    batch_positions = [d for d in range(out_ndim) if d not in dn.offset_dims]
    perm_out = [0] * out_ndim
    for k, d in enumerate(batch_positions):
      perm_out[d] = k
    for k, d in enumerate(dn.offset_dims):
      perm_out[int(d)] = n_batch + k
    if p["mode"] == lax.GatherScatterMode.FILL_OR_DROP:  # rows out of range read the fill value
      fill = p.get("fill_value")
      if fill is None:  # lax.gather's defaults
        dtype = np.dtype(operand.dtype)
        fill = {"f": np.nan, "b": True, "i": np.iinfo(dtype).min if dtype.kind == "i" else 0}.get(dtype.kind)
        fill = np.iinfo(dtype).max if dtype.kind == "u" else fill
      mask = g.reshape(ok, [*idx.shape[:-1]] + [1] * len(whole))
      rows = g.op("Where", [mask, rows, g.const(np.asarray(fill, operand.dtype))])
    return g.op("Transpose", [rows], perm=perm_out) if perm_out != list(range(out_ndim)) else rows

  def _scatter(self, p, ins, in_avals, out_avals, reduction: str):
    """XLA scatters of whole rows (every indexed dim inserted, the window dims the operand's remaining dims in
    order) -> ScatterND. Out-of-range writes (mode 'drop') go to an extra row that is cut off."""
    g = self.g
    dn = p["dimension_numbers"]
    operand, idx, upd = in_avals
    index_map = [int(d) for d in dn.scatter_dims_to_operand_dims]
    batch_op = [int(d) for d in dn.operand_batching_dims]
    batch_idx = [int(d) for d in dn.scatter_indices_batching_dims]
    window = [int(d) for d in dn.update_window_dims]
    rest = [d for d in range(operand.ndim) if d not in (*index_map, *batch_op)]
    if sorted(int(d) for d in dn.inserted_window_dims) != sorted(index_map) or window != list(
      range(upd.ndim - len(rest), upd.ndim)
    ):
      raise NotImplementedError(f"ONNX export: scatter {dn}")
    full, perm, ok = self._full_indices(ins[1], idx.shape, batch_op, batch_idx, operand.shape, index_map)
    data = g.op("Transpose", [ins[0]], perm=perm) if perm != list(range(operand.ndim)) else ins[0]
    # one extra row on the last indexed dim takes the dropped writes
    last = len(batch_op) + len(index_map) - 1
    pads = [0] * operand.ndim * 2
    pads[operand.ndim + last] = 1
    data = g.op("Pad", [data, g.i64(pads)], mode="constant")
    spare = np.zeros(len(batch_op) + len(index_map), np.int64)
    spare[-1] = operand.shape[index_map[-1]]
    full = g.op("Where", [g.op("Unsqueeze", [ok, g.i64([-1])]), full, g.const(spare)])
    out = g.op("ScatterND", [data, full, ins[2]], reduction=reduction)
    n = operand.ndim
    starts, ends = [0] * n, [operand.shape[d] for d in perm]
    out = g.op("Slice", [out, g.i64(starts), g.i64(ends), g.i64(range(n))])
    return g.op("Transpose", [out], perm=list(np.argsort(perm))) if perm != list(range(n)) else out

  def p_scatter(self, p, ins, in_avals, out_avals):
    return self._scatter(p, ins, in_avals, out_avals, "none")

  def p_scatter_add(self, p, ins, in_avals, out_avals):
    return self._scatter(p, ins, in_avals, out_avals, "add")

  def p_scatter_max(self, p, ins, in_avals, out_avals):
    return self._scatter(p, ins, in_avals, out_avals, "max")


def convert(
  fn: Callable,
  weights: Any,
  args: Sequence[jax.ShapeDtypeStruct],
  input_names: Sequence[str],
  output_names: Sequence[str],
  external: tuple[str, dict[str, tuple[int, int]]] | None = None,
) -> onnx.ModelProto:
  """The ONNX model of fn(weights, *args) (outputs: a dict, or a tuple in output_names' order). weights: a pytree
  stored as initializers named by their paths; external = (file, {name: (offset, length)}) keeps them in that file
  beside the model, which every canvas shares (`write_weights` writes it)."""
  closed, out_tree = jax.make_jaxpr(fn, return_shape=True)(weights, *args)
  leaves = jax.tree_util.tree_flatten_with_path(weights)[0]
  weight_names = [weight_name(path) for path, _ in leaves]
  g = _Graph()
  for (_, leaf), name in zip(leaves, weight_names, strict=True):
    tensor = onnx.TensorProto(name=name, data_type=_onnx_type(leaf.dtype), dims=list(np.shape(leaf)))
    if external is None:
      tensor = numpy_helper.from_array(np.asarray(leaf), name)
    else:
      file, places = external
      offset, length = places[name]
      tensor.data_location = TensorProto.EXTERNAL
      for k, v in (("location", file), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=k, value=v)
    g.initializers.append(tensor)
  outs = _Converter(g).jaxpr(closed.jaxpr, closed.consts, [*weight_names, *input_names])
  if isinstance(out_tree, dict):
    flat_names = sorted(out_tree)  # make_jaxpr flattens a dict by sorted keys
    outs = [outs[flat_names.index(n)] for n in output_names]
    out_avals = [out_tree[n] for n in output_names]
  else:
    out_avals = list(out_tree)
  final = []
  for o, n in zip(outs, output_names, strict=True):  # graph outputs need their own names
    g.nodes.append(helper.make_node("Identity", [o], [n]))
    final.append(n)
  used = {name for node in g.nodes for name in node.input}
  g.initializers = [t for t in g.initializers if t.name in used]  # e.g. weights the function does not read
  info = lambda names, avals: [
    helper.make_tensor_value_info(n, _onnx_type(a.dtype), list(a.shape)) for n, a in zip(names, avals, strict=True)
  ]
  graph = helper.make_graph(g.nodes, "sparse_detr", info(input_names, args), info(final, out_avals), g.initializers)
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sparse_detr_jax")


def weight_name(path: tuple) -> str:
  return "w:" + "/".join(str(getattr(k, "key", k)) for k in path)


def write_weights(weights: Any, path: pathlib.Path) -> dict[str, tuple[int, int]]:
  """The weights' leaves, raw little-endian, 64-byte aligned, in one file: {initializer name: (offset, length)}."""
  places = {}
  with open(path, "wb") as f:
    for key, leaf in jax.tree_util.tree_flatten_with_path(weights)[0]:
      raw = np.ascontiguousarray(np.asarray(leaf)).astype(np.asarray(leaf).dtype.newbyteorder("<")).tobytes()
      f.write(b"\0" * (-f.tell() % 64))
      places[weight_name(key)] = (f.tell(), len(raw))
      f.write(raw)
  return places
