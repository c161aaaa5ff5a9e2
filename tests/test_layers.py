"""layers.PointwiseConv: the same parameters, outputs and gradients as a 1x1 `nn.Conv` (torch-style, no padding)."""

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
  pointwise = layers.PointwiseConv(5, stride, use_bias=use_bias, bias_init=nn.initializers.normal(1.0))
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
  for a, b in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_pointwise_conv_computes_in_its_dtype():
  x = jnp.ones((1, 4, 4, 8), jnp.float32)
  pointwise = layers.PointwiseConv(3, dtype=jnp.bfloat16)
  variables = pointwise.init(jax.random.PRNGKey(0), x)
  assert variables["params"]["kernel"].dtype == jnp.float32  # float32 parameters
  assert pointwise.apply(variables, x).dtype == jnp.bfloat16
