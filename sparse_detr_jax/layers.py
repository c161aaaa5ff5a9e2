"""Small layers with PyTorch's default initialisation, so a model built here starts where the official one does."""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jnp.ndarray]

# torch.nn.Linear / Conv default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
xavier_uniform = nn.initializers.xavier_uniform()
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm / GroupNorm default


def layer_norm(name: str | None = None, dtype: Any = None) -> nn.LayerNorm:
  """LayerNorm with PyTorch's epsilon and exact (two-pass) variance."""
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype, name=name)


def group_norm(name: str | None = None, dtype: Any = None) -> nn.GroupNorm:
  """GroupNorm(32) with PyTorch's epsilon and exact variance."""
  return nn.GroupNorm(num_groups=32, epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype, name=name)


def matmul(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """x (..., Cin) @ kernel (Cin, Cout) -> (..., Cout), as one product of rows: (prod(...), Cin) @ (Cin, Cout).

  Flat rows give the kernel gradient as x^T dy over one contracted dimension, which XLA:CPU computes from both
  operands as stored; over the 3-4 leading dimensions of the unflattened product it transposes one of them
  first, fused into the element-wise backward that produces dy (a ReLU / frozen BatchNorm backward), where the
  transposed writes cost up to 76 ms for one 2x48x64x512 ResNet tensor on 2 cores.
  """
  return jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])


class Linear(nn.Module):
  """Dense layer whose default bias init is torch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Parameters are named `kernel` (in, out) and `bias` (out,), like flax.linen.Dense.
  """

  features: int
  kernel_init: Initializer = torch_default_kernel
  bias_init: Initializer | None = None  # None: torch default (needs fan_in)
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    fan_in = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (fan_in, self.features), jnp.float32)
    if self.bias_init is None:
      bound = 1.0 / fan_in**0.5
      bias_init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    else:
      bias_init = self.bias_init
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    dtype = self.dtype or x.dtype
    y = matmul(x.astype(dtype), kernel.astype(dtype))
    return y + bias.astype(dtype)


def _conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: int) -> jnp.ndarray:
  return jax.lax.conv_general_dilated(
    x, kernel, (stride, stride), ((padding, padding), (padding, padding)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def conv_kernel_grad(x: jnp.ndarray, dy: jnp.ndarray, kernel_size: int, stride: int, padding: int) -> jnp.ndarray:
  """The kernel gradient of a k x k convolution as k * k matrix products, one per kernel tap.

  x (B, H, W, Cin), dy (B, H', W', Cout) -> (k, k, Cin, Cout): tap (i, j) is dy^T (Cout, B * H' * W') times the
  input pixels it reads (a strided slice of the padded input, (B * H' * W', Cin)), transposed at the end (a
  kernel-sized copy). XLA:CPU computes this gradient as a convolution, slower on every 3x3 layer of ResNet-50
  (benchmarks/conv_kernel_grad.py, 2 cores, batch 2: all 13 trained ones 1.85x at 384x512, 4.55x at 800x1333,
  where a layer2 one takes 1941 ms against 243 ms).
  """
  b, ho, wo, cout = dy.shape
  cin = x.shape[-1]
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  dy_t = dy.reshape(-1, cout).T  # (Cout, B * H' * W')
  reach_h, reach_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
  taps = [
    jnp.dot(
      dy_t,
      xp[:, i : i + reach_h : stride, j : j + reach_w : stride].reshape(-1, cin),
      preferred_element_type=jnp.float32,
    )  # (Cout, Cin)
    for i in range(kernel_size)
    for j in range(kernel_size)
  ]
  grad = jnp.stack(taps).reshape(kernel_size, kernel_size, cout, cin)
  return jnp.swapaxes(grad, 2, 3).astype(x.dtype)


def _varying_axes(x: jnp.ndarray) -> frozenset:
  """The mesh axes x varies over inside shard_map (jax 0.10: `manual_axis_type.varying`; `vma` where avals have it)."""
  aval = jax.typeof(x)
  return aval.manual_axis_type.varying if hasattr(aval, "manual_axis_type") else frozenset(getattr(aval, "vma", ()))


def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: int) -> jnp.ndarray:
  """A square convolution with torch-style symmetric zero padding: x (B, H, W, Cin), kernel (k, k, Cin, Cout) ->
  (B, (H + 2 * padding - k) // stride + 1, ..., Cout). On a CPU its kernel gradient is `conv_kernel_grad`; on
  other platforms, and for the input gradient everywhere, XLA's own.

  Inside `jax.shard_map` the kernel (a replicated parameter) is first made varying over the input's mesh axes, so
  the custom gradient is per device like XLA's and the cross-device sum stays where JAX puts it, outside.
  """
  axes = tuple(sorted(_varying_axes(x) - _varying_axes(kernel)))
  if axes:
    kernel = jax.lax.pcast(kernel, axes, to="varying")
  return _conv2d(x, kernel, stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: int) -> jnp.ndarray:
  return _conv(x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
  return _conv(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  dx = jax.vjp(lambda x: _conv(x, kernel, stride, padding), x)[1](dy)[0]
  dk = jax.lax.platform_dependent(
    x,
    dy,
    cpu=functools.partial(conv_kernel_grad, kernel_size=kernel.shape[0], stride=stride, padding=padding),
    default=lambda x, dy: jax.vjp(lambda k: _conv(x, k, stride, padding), kernel)[1](dy)[0],
  )
  return dx, dk


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
  """A k x k convolution, stride s, with torch-style zero padding k // 2.

  Parameters as `nn.Conv(features, (k, k))`: `kernel` (k, k, in, out) and, with `use_bias`, `bias` (out,).
  A 1x1 convolution is one matrix product over the (every s-th) pixels: XLA:CPU runs a pointwise convolution as
  a convolution, up to 5x slower than the same product as a matmul (256->64 channels on a 200x267 map, 2 cores:
  53 ms vs 10 ms), and so are its gradients. A larger kernel goes through `conv2d`. The README's benchmark
  section gives the effect of both on the whole model.
  """

  features: int
  kernel_size: int = 1
  strides: int = 1
  use_bias: bool = True
  kernel_init: Initializer = torch_default_kernel
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x (B, H, W, C) -> (B, ceil(H / s), ceil(W / s), features) (odd k)."""
    k, s = self.kernel_size, self.strides
    if k == 1 and s > 1:
      x = x[:, ::s, ::s]  # a 1x1 stride-s convolution reads every s-th pixel
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = matmul(x, kernel[0, 0]) if k == 1 else conv2d(x, kernel, s, k // 2)  # (B, H', W', features)
    return y if bias is None else y + bias


class MLP(nn.Module):
  """The official box head: `num_layers` Linear layers with ReLU between them."""

  hidden_dim: int
  output_dim: int
  num_layers: int
  last_bias_init: Initializer = nn.initializers.zeros
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(self.num_layers - 1):
      x = nn.relu(Linear(self.hidden_dim, dtype=self.dtype, name=f"layers_{i}")(x))
    # The official init zeroes the last layer, so a fresh head predicts the reference box itself.
    return Linear(
      self.output_dim,
      kernel_init=nn.initializers.zeros,
      bias_init=self.last_bias_init,
      dtype=self.dtype,
      name=f"layers_{self.num_layers - 1}",
    )(x)
