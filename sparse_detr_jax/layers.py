"""Small layers with PyTorch's default initialisation, so a model built here starts where the official one does."""

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
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    return y + bias.astype(dtype)


class PointwiseConv(nn.Module):
  """A 1x1 convolution (stride s, no padding) computed as one matrix product over the pixels.

  Parameters as `nn.Conv(features, (1, 1))`: `kernel` (1, 1, in, out) and, with `use_bias`, `bias` (out,).
  XLA:CPU runs a pointwise convolution as a convolution, up to 5x slower than the same product as a matmul
  (256->64 channels on a 200x267 map, 2 cores: 53 ms vs 10 ms), and so are its gradients; the README's
  benchmark section gives the effect on the whole model.
  """

  features: int
  strides: int = 1
  use_bias: bool = True
  kernel_init: Initializer = torch_default_kernel
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x (B, H, W, C) -> (B, ceil(H / s), ceil(W / s), features)."""
    s = self.strides
    x = x[:, ::s, ::s] if s > 1 else x  # a 1x1 stride-s convolution reads every s-th pixel
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jnp.dot(x, kernel[0, 0])  # (B, H', W', features)
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
