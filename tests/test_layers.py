"""layers.Conv: the same parameters, outputs and gradients as `nn.Conv` with torch-style padding (none for 1x1,
k // 2 for k x k); conv_kernel_grad equals XLA's kernel gradient; layers.matmul equals jnp.dot."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_detr_jax import layers


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("use_bias", [True, False])
def test_pointwise_conv_equals_a_1x1_conv(stride, use_bias):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 10, 12))  # odd height: stride 2 keeps rows 0, 2, 4, 6
  conv = nn.Conv(5, (1, 1), strides=(stride, stride), padding=((0, 0), (0, 0)), use_bias=use_bias)
  pointwise = layers.Conv(5, 1, stride, use_bias=use_bias, bias_init=nn.initializers.normal(1.0))
  variables = pointwise.init(jax.random.PRNGKey(1), x)
  shapes = jax.tree_util.tree_map(jnp.shape, variables)
  assert shapes == jax.tree_util.tree_map(jnp.shape, conv.init(jax.random.PRNGKey(1), x))  # same checkpoints
  want = conv.apply(variables, x)
  got = pointwise.apply(variables, x)
  assert got.shape == want.shape == (2, -(-7 // stride), -(-10 // stride), 5)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  loss = lambda module: lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
  g_want = jax.grad(loss(conv), argnums=(0, 1))(variables, x)
  g_got = jax.grad(loss(pointwise), argnums=(0, 1))(variables, x)
  # The kernel gradient sums 140 pixels (entries up to ~20) in another order than XLA's convolution: float32's
  # rounding of that order, relative.
  for a, b in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=2e-6)


def test_pointwise_conv_computes_in_its_dtype():
  x = jnp.ones((1, 4, 4, 8), jnp.float32)
  pointwise = layers.Conv(3, dtype=jnp.bfloat16)
  variables = pointwise.init(jax.random.PRNGKey(0), x)
  assert variables["params"]["kernel"].dtype == jnp.float32  # float32 parameters
  assert pointwise.apply(variables, x).dtype == jnp.bfloat16


@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (3, 2), (7, 2)])
def test_conv_equals_nn_conv(kernel, stride):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 14, 6))  # odd height: stride 2 rounds the output up
  pad = kernel // 2
  conv = nn.Conv(5, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)))
  ours = layers.Conv(5, kernel, stride, bias_init=nn.initializers.normal(1.0))
  variables = ours.init(jax.random.PRNGKey(1), x)
  assert jax.tree_util.tree_map(jnp.shape, variables) == jax.tree_util.tree_map(
    jnp.shape, conv.init(jax.random.PRNGKey(1), x)
  )  # same checkpoints
  want = conv.apply(variables, x)
  assert want.shape == (2, -(-11 // stride), -(-14 // stride), 5)
  np.testing.assert_allclose(ours.apply(variables, x), want, atol=1e-5, rtol=0)
  loss = lambda module: lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
  g_want = jax.grad(loss(conv), argnums=(0, 1))(variables, x)
  g_got = jax.grad(loss(ours), argnums=(0, 1))(variables, x)  # on this CPU: conv_kernel_grad
  for a, b in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 1, 1), (3, 2, 1), (5, 2, 0)])
def test_conv_kernel_grad_equals_xla(kernel, stride, padding):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 13, 10, 4))
  k = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 4, 7))
  conv = lambda k: jax.lax.conv_general_dilated(
    x, k, (stride, stride), ((padding, padding), (padding, padding)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  y, vjp = jax.vjp(conv, k)
  dy = jax.random.normal(jax.random.PRNGKey(2), y.shape)
  got = layers.conv_kernel_grad(x, dy, kernel, stride, padding)
  assert got.shape == k.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, vjp(dy)[0], atol=1e-4, rtol=1e-5)


def test_conv_computes_in_its_dtype():
  x = jnp.ones((1, 6, 6, 8), jnp.float32)
  conv = layers.Conv(3, 3, 2, dtype=jnp.bfloat16)
  variables = conv.init(jax.random.PRNGKey(0), x)
  assert variables["params"]["kernel"].dtype == jnp.float32
  assert conv.apply(variables, x).dtype == jnp.bfloat16
  grads = jax.grad(lambda v: jnp.sum(conv.apply(v, x).astype(jnp.float32)))(variables)
  assert grads["params"]["kernel"].dtype == jnp.float32  # the bf16 kernel gradient, cast back to the parameter's


def test_matmul_equals_dot_over_leading_dimensions():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 12))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (12, 7))
  got = layers.matmul(x, kernel)
  assert got.shape == (2, 3, 5, 7)
  np.testing.assert_allclose(got, jnp.dot(x, kernel), atol=1e-5, rtol=0)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  got, want = jax.grad(loss(layers.matmul), (0, 1))(x, kernel), jax.grad(loss(jnp.dot), (0, 1))(x, kernel)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=2e-6)  # the kernel gradient sums 30 rows in another order
