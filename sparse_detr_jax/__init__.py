"""sparse_detr_jax: Sparse DETR (Roh et al., ICLR 2022) in JAX/Flax.

Where each paper concept lives:
  scoring network ............ sparsity.ScoringNetwork
  top-rho token selection .... sparsity.select_top_rho / sparsity.scatter_kept
  encoder auxiliary heads .... transformer.SparseEncoder (aux heads) and model.SparseDETR
  top-k decoder queries ...... transformer.select_topk_queries
  deformable attention ....... deformable_attention.deformable_sample / MSDeformAttn
  official checkpoints ....... convert.load_official
"""
