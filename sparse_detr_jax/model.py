"""SparseDETR: backbone -> multi-scale projections -> (sparse) deformable encoder -> top-k queries ->
deformable decoder with iterative box refinement, with every head the official model has.

`SparseDETR(config).apply(variables, images, padding_mask)` takes images (B, H, W, 3) float32,
normalised with the ImageNet mean/std, and padding_mask (B, H, W) bool (True = padding), and returns
a dict named as the official model's outputs (see `SparseDETR.__call__`).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparse_detr_jax import config as config_lib
from sparse_detr_jax import layers
from sparse_detr_jax.backbone import build_backbone, resize_mask
from sparse_detr_jax.box_ops import inverse_sigmoid
from sparse_detr_jax.position_encoding import box_position_embedding, sine_position_embedding
from sparse_detr_jax.sparsity import ScoringNetwork, gather_tokens, scatter_kept, select_top_rho
from sparse_detr_jax.transformer import (
  DecoderLayer,
  EncoderLayer,
  encoder_proposals,
  encoder_reference_points,
  select_topk_queries,
  valid_ratios,
)

PRIOR_PROB = 0.01  # focal-loss prior of the class heads' bias


def num_prediction_heads(c: ml_collections.ConfigDict) -> int:
  """Official head list: [decoder 0..L_dec-1, two-stage encoder head, encoder aux 0..L_enc-2]."""
  return c.dec_layers + int(c.two_stage) + (c.enc_layers - 1 if c.use_enc_aux_loss else 0)


def heads_are_cloned(c: ml_collections.ConfigDict) -> bool:
  """Separate heads per prediction slot (else one head shared by all decoder layers, as official)."""
  return bool(c.with_box_refine or c.use_enc_aux_loss)


class InputProjection(nn.Module):
  """Conv (1x1, or 3x3 stride 2 for the extra levels) + GroupNorm(32) to hidden_dim channels."""

  hidden_dim: int
  downsample: bool
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k, s = (3, 2) if self.downsample else (1, 1)
    x = layers.Conv(self.hidden_dim, k, s, kernel_init=layers.xavier_uniform, dtype=self.dtype, name="conv")(x)
    return layers.group_norm("norm", self.dtype)(x)


class SparseDETR(nn.Module):
  """Sparse DETR (rho > 0) and Deformable DETR (rho = 0) with official semantics; see config.model_config."""

  config: ml_collections.FrozenConfigDict

  def setup(self):
    c = self.config
    config_lib.validate(c)
    dt = jnp.dtype(c.dtype)
    self.backbone = build_backbone(c, dt)
    n_backbone = len(self.backbone.num_channels)
    self.input_proj = [
      InputProjection(c.hidden_dim, downsample=l >= n_backbone, dtype=dt) for l in range(c.num_feature_levels)
    ]
    self.level_embed = self.param("level_embed", nn.initializers.normal(1.0), (c.num_feature_levels, c.hidden_dim))
    if c.rho > 0:
      self.mask_predictor = ScoringNetwork(c.hidden_dim, dtype=dt)
    if c.rho > 0 or c.two_stage:
      self.enc_output = layers.Linear(c.hidden_dim, kernel_init=layers.xavier_uniform, dtype=dt)
      self.enc_output_norm = layers.layer_norm(dtype=dt)
    layer_args = dict(
      d_model=c.hidden_dim,
      d_ffn=c.dim_feedforward,
      dropout=c.dropout,
      n_levels=c.num_feature_levels,
      n_heads=c.nheads,
      dtype=dt,
    )
    self.encoder_layers = [EncoderLayer(n_points=c.enc_n_points, **layer_args) for _ in range(c.enc_layers)]
    self.decoder_layers = [DecoderLayer(n_points=c.dec_n_points, **layer_args) for _ in range(c.dec_layers)]
    if c.two_stage:
      width = c.hidden_dim * (1 if c.eff_query_init else 2)
      self.pos_trans = layers.Linear(width, kernel_init=layers.xavier_uniform, dtype=dt)
      self.pos_trans_norm = layers.layer_norm(dtype=dt)
    else:
      self.query_embed = self.param("query_embed", nn.initializers.normal(1.0), (c.num_queries, 2 * c.hidden_dim))
      self.reference_points = layers.Linear(
        2, kernel_init=layers.xavier_uniform, bias_init=nn.initializers.zeros, dtype=dt
      )
    n_heads = num_prediction_heads(c) if heads_are_cloned(c) else 1
    prior_bias = nn.initializers.constant(-math.log((1 - PRIOR_PROB) / PRIOR_PROB))
    self.class_embed = [layers.Linear(c.num_classes, bias_init=prior_bias, dtype=dt) for _ in range(n_heads)]
    self.bbox_embed = [
      layers.MLP(c.hidden_dim, 4, 3, last_bias_init=self._box_bias_init(i), dtype=dt) for i in range(n_heads)
    ]

  def _box_bias_init(self, head: int):
    """Official last-layer box bias: size logits -2 on the first (or shared) head, 0 in two-stage models."""
    size_bias = -2.0 if (head == 0 and not self.config.two_stage) else 0.0
    return lambda key, shape, dtype=jnp.float32: jnp.array([0.0, 0.0, size_bias, size_bias], dtype)

  def _head(self, i: int):
    j = i if heads_are_cloned(self.config) else 0
    return self.class_embed[j], self.bbox_embed[j]

  def _output_memory(self, memory: jnp.ndarray, proposal_valid: jnp.ndarray) -> jnp.ndarray:
    """Official two-stage memory processing: zero padded/invalid tokens, Linear, LayerNorm. (B, N, C)."""
    return self.enc_output_norm(self.enc_output(jnp.where(proposal_valid[..., None], memory, 0.0)))

  def _decoder_step(self, layer, heads, tgt, query_pos, reference, ratios, memory, shapes, mask_flat, det):
    """One decoder layer and its heads: (tgt, next reference, (logits, boxes, sampling locations, weights));
    with refinement each layer's box is the next layer's reference."""
    cls_head, box_head = heads
    scale = jnp.concatenate([ratios, ratios], -1) if reference.shape[-1] == 4 else ratios
    ref_in = reference[:, :, None] * scale[:, None]  # (B, Q, L, 2|4)
    tgt, loc, attw = layer(tgt, query_pos, ref_in, memory, shapes, mask_flat, det)
    delta = box_head(tgt).astype(jnp.float32)  # (B, Q, 4)
    inv_ref = inverse_sigmoid(reference)
    unact = delta + inv_ref if reference.shape[-1] == 4 else delta.at[..., :2].add(inv_ref)
    box = jax.nn.sigmoid(unact)
    if self.config.with_box_refine:
      reference = jax.lax.stop_gradient(box)
    return tgt, reference, (cls_head(tgt).astype(jnp.float32), box, loc, attw)

  def _scanned(self) -> bool:
    return config_lib.scans_layers(self.config) and not self.is_initializing()

  def _stacked(self, name: str, ids) -> Any:
    """The parameters of submodules NAME_i for i in ids, stacked on a new leading axis."""
    p = self.variables["params"]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *(p[f"{name}_{i}"] for i in ids))

  def _layer_keys(self, n: int, det: bool) -> jnp.ndarray:
    """One dropout key per scanned layer: (n, 2) uint32 (unused, zeros, when deterministic)."""
    return jnp.zeros((n, 2), jnp.uint32) if det else jax.random.split(self.make_rng("dropout"), n)

  def _scanned_encoder(self, tgt, memory, sel, q_pos, q_ref, shapes, mask_flat, det):
    """The encoder layers as one `lax.scan` over their stacked parameters (one compiled layer body).
    Returns (tgt, memory, per-layer tgt (enc_layers, B, K|N, C))."""
    layer = self.encoder_layers[0].clone(parent=None)

    def body(carry, xs):
      tgt, memory = carry
      params, key = xs
      rngs = {} if det else {"dropout": key}
      tgt = layer.apply({"params": params}, tgt, q_pos, q_ref, memory, shapes, mask_flat, det, rngs=rngs)
      memory = scatter_kept(memory, tgt, sel) if sel is not None else tgt
      return (tgt, memory), tgt

    n = self.config.enc_layers
    xs = (self._stacked("encoder_layers", range(n)), self._layer_keys(n, det))
    (tgt, memory), per_layer = jax.lax.scan(body, (tgt, memory), xs)
    return tgt, memory, per_layer

  def _scanned_decoder(self, tgt, query_pos, reference, ratios, memory, shapes, mask_flat, det):
    """The decoder layers and their heads as one `lax.scan`: per-layer (logits, boxes, locations, weights), each
    stacked on a leading layer axis."""
    c = self.config
    n = c.dec_layers
    layer = self.decoder_layers[0].clone(parent=None)
    cls_head, box_head = (h.clone(parent=None) for h in self._head(0))
    if heads_are_cloned(c):
      head_params = (self._stacked("class_embed", range(n)), self._stacked("bbox_embed", range(n)))
    else:  # one head shared by every layer
      shared = (self.variables["params"]["class_embed_0"], self.variables["params"]["bbox_embed_0"])
      head_params = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), shared)

    def body(carry, xs):
      tgt, reference = carry
      params, (cls_p, box_p), key = xs
      rngs = {} if det else {"dropout": key}
      apply = lambda *a: layer.apply({"params": params}, *a, rngs=rngs)
      heads = (lambda x: cls_head.apply({"params": cls_p}, x), lambda x: box_head.apply({"params": box_p}, x))
      tgt, reference, outputs = self._decoder_step(
        apply, heads, tgt, query_pos, reference, ratios, memory, shapes, mask_flat, det
      )
      return (tgt, reference), outputs

    xs = (self._stacked("decoder_layers", range(n)), head_params, self._layer_keys(n, det))
    _, (logits, boxes, locs, attws) = jax.lax.scan(body, (tgt, reference), xs)
    return list(logits), list(boxes), list(locs), list(attws)

  def __call__(self, images: jnp.ndarray, padding_mask: jnp.ndarray, train: bool = False) -> dict[str, Any]:
    """images (B, H, W, 3) float32 normalised; padding_mask (B, H, W) bool, True on padding.

    Returns (B = batch, Q = num_queries, N = tokens, K = kept slots, L = levels, M = heads, P = points):
      pred_logits (B, Q, classes), pred_boxes (B, Q, 4) cxcywh in [0, 1] of the valid image;
      aux_outputs: list over earlier decoder layers of {pred_logits, pred_boxes};
      enc_outputs: {pred_logits (B, N, classes), pred_boxes (B, N, 4)} (two-stage);
      aux_outputs_enc: list over encoder layers but the last of {pred_logits, pred_boxes} (B, K, ...);
      backbone_mask_prediction (B, N) scoring logits (padding = batch min), backbone_topk_proposals
      (B, K), sparse_token_nums (B,), kept_slot_mask (B, K) (rho > 0);
      query_indices (B, Q) (two-stage); sampling_locations_dec (B, L_dec, Q, M, L, P, 2),
      attn_weights_dec (B, L_dec, Q, M, L, P); mask_flatten (B, N); spatial_shapes (L, 2) static.
    """
    c = self.config
    check_inputs(images, padding_mask)
    det = not train
    dt = jnp.dtype(c.dtype)
    b = images.shape[0]

    # Multi-scale features, masks and positions.
    feats = self.backbone(images.astype(dt), train)
    srcs, masks = [], []
    for l in range(c.num_feature_levels):
      src = self.input_proj[l](feats[l] if l < len(feats) else (feats[-1] if l == len(feats) else srcs[-1]))
      srcs.append(src)  # (B, h_l, w_l, C)
      masks.append(resize_mask(padding_mask, src.shape[1:3]))  # (B, h_l, w_l)
    shapes = tuple((int(s.shape[1]), int(s.shape[2])) for s in srcs)
    if c.two_stage and sum(h * w for h, w in shapes) < c.num_queries:
      raise ValueError(
        f"images: a {images.shape[1]}x{images.shape[2]} canvas gives {sum(h * w for h, w in shapes)} "
        f"encoder tokens, fewer than model.num_queries = {c.num_queries}: use larger images"
      )
    pos = [sine_position_embedding(m, c.hidden_dim // 2) + self.level_embed[l] for l, m in enumerate(masks)]
    src_flat = jnp.concatenate([s.reshape(b, -1, c.hidden_dim) for s in srcs], 1)  # (B, N, C)
    pos_flat = jnp.concatenate([p.reshape(b, -1, c.hidden_dim) for p in pos], 1).astype(dt)
    mask_flat = jnp.concatenate([m.reshape(b, -1) for m in masks], 1)  # (B, N)
    ratios = valid_ratios(masks)  # (B, L, 2)
    ref_enc = encoder_reference_points(shapes, ratios)  # (B, N, L, 2)
    proposals, proposal_valid = encoder_proposals(mask_flat, shapes)  # (B, N, 4), (B, N)
    out: dict[str, Any] = {"mask_flatten": mask_flat, "spatial_shapes": np.asarray(shapes, np.int32)}

    # Encoder: with rho > 0 only the top-rho tokens are queries; values are always the whole memory.
    memory = src_flat
    sel = None
    if c.rho > 0:
      scores = self.mask_predictor(self._output_memory(src_flat + pos_flat, proposal_valid))  # (B, N)
      sel = select_top_rho(scores, mask_flat, c.rho)
      q_pos, q_ref, q_props = (gather_tokens(x, sel.indices) for x in (pos_flat, ref_enc, proposals))
      tgt = gather_tokens(memory, sel.indices)  # (B, K, C)
      out.update(
        backbone_mask_prediction=sel.scores,
        backbone_topk_proposals=sel.indices,
        sparse_token_nums=sel.counts,
        kept_slot_mask=sel.slot_mask,
      )
    else:
      q_pos, q_ref, q_props = pos_flat, ref_enc, proposals
    if self._scanned():
      tgt, memory, per_layer = self._scanned_encoder(tgt if sel is not None else memory, memory, sel, q_pos, q_ref,
                                                     shapes, mask_flat, det)  # fmt: skip
    else:
      per_layer = []
      for layer in self.encoder_layers:
        if sel is not None:
          tgt = layer(tgt, q_pos, q_ref, memory, shapes, mask_flat, det)
          memory = scatter_kept(memory, tgt, sel)
        else:
          tgt = memory = layer(memory, q_pos, q_ref, memory, shapes, mask_flat, det)
        per_layer.append(tgt)
    enc_aux = []
    first_enc_aux_head = num_prediction_heads(c) - (c.enc_layers - 1)
    for lid in range(c.enc_layers - 1 if c.use_enc_aux_loss else 0):
      cls_head, box_head = self._head(first_enc_aux_head + lid)
      enc_aux.append(
        {
          "pred_logits": cls_head(per_layer[lid]).astype(jnp.float32),
          "pred_boxes": jax.nn.sigmoid((q_props + box_head(per_layer[lid])).astype(jnp.float32)),
        }
      )
    if c.use_enc_aux_loss:
      out["aux_outputs_enc"] = enc_aux

    # Decoder queries: top-k encoder tokens (two-stage) or learned embeddings.
    if c.two_stage:
      cls_head, box_head = self._head(c.dec_layers)
      out_mem = self._output_memory(memory, proposal_valid)
      enc_logits = cls_head(out_mem).astype(jnp.float32)  # (B, N, classes)
      enc_unact = (proposals + box_head(out_mem)).astype(jnp.float32)  # (B, N, 4)
      out["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": jax.nn.sigmoid(enc_unact)}
      topk = select_topk_queries(enc_logits, enc_unact, c.num_queries, c.eff_specific_head)
      out["query_indices"] = topk.indices
      reference = jax.nn.sigmoid(topk.boxes_unact)  # (B, Q, 4)
      pos_trans = self.pos_trans_norm(self.pos_trans(box_position_embedding(topk.boxes_unact).astype(dt)))
      if c.eff_query_init:
        query_pos, tgt = pos_trans, gather_tokens(memory, topk.indices)
      else:
        query_pos, tgt = pos_trans[..., : c.hidden_dim], pos_trans[..., c.hidden_dim :]
    else:
      query_pos = jnp.broadcast_to(self.query_embed[:, : c.hidden_dim].astype(dt), (b, c.num_queries, c.hidden_dim))
      tgt = jnp.broadcast_to(self.query_embed[:, c.hidden_dim :].astype(dt), (b, c.num_queries, c.hidden_dim))
      reference = jax.nn.sigmoid(self.reference_points(query_pos).astype(jnp.float32))  # (B, Q, 2)

    # Decoder with per-layer heads; with refinement each layer's box is the next layer's reference.
    if self._scanned():
      logits, boxes, locs, attws = self._scanned_decoder(tgt, query_pos, reference, ratios, memory, shapes,
                                                         mask_flat, det)  # fmt: skip
    else:
      logits, boxes, locs, attws = [], [], [], []
      for lid, layer in enumerate(self.decoder_layers):
        tgt, reference, outputs = self._decoder_step(
          layer, self._head(lid), tgt, query_pos, reference, ratios, memory, shapes, mask_flat, det
        )
        for acc, x in zip((logits, boxes, locs, attws), outputs, strict=True):
          acc.append(x)
    out.update(
      pred_logits=logits[-1],
      pred_boxes=boxes[-1],
      sampling_locations_dec=jnp.stack(locs, 1),
      attn_weights_dec=jnp.stack(attws, 1),
    )
    if c.aux_loss:
      out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": bx} for a, bx in zip(logits[:-1], boxes[:-1], strict=True)]
    return out


def check_inputs(images: jnp.ndarray, padding_mask: jnp.ndarray) -> None:
  """Shape and dtype checks of the model inputs, with an error naming the argument."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images: expected (B, H, W, 3) NHWC, got shape {tuple(images.shape)}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images: expected normalised floats, got dtype {images.dtype}")
  if padding_mask.shape != images.shape[:3] or padding_mask.dtype != jnp.bool_:
    raise ValueError(
      f"padding_mask: expected bool {tuple(images.shape[:3])} (True = padding), "
      f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
    )


def build_model(config: ml_collections.ConfigDict) -> SparseDETR:
  """A SparseDETR for a model config (see config.model_config)."""
  return SparseDETR(ml_collections.FrozenConfigDict(config))


def dummy_inputs(c: ml_collections.ConfigDict):
  """A blank (1, S, S) batch with at least num_queries tokens, for initialisation and shape inference."""
  s = max(64, 16 * math.ceil(math.sqrt(c.num_queries)))
  return jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, s, s), bool)


def init_variables(model: SparseDETR, rng: jax.Array) -> dict[str, Any]:
  """Freshly initialised variables ({'params', and 'batch_stats' for ResNet}) with the official init."""
  return jax.jit(model.init)(rng, *dummy_inputs(model.config))


def variable_shapes(model: SparseDETR) -> dict[str, Any]:
  """The variables' ShapeDtypeStructs, without computing anything."""
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *dummy_inputs(model.config))
