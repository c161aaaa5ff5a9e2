"""sparse_detr_jax: Sparse DETR (Roh et al., ICLR 2022) in JAX/Flax.

    from sparse_detr_jax import Detector
    detector = Detector.from_checkpoint("sparse_detr_r50_10.pth")
    detections = detector(image)  # [{'box': [x0, y0, x1, y1], 'score', 'category_id', 'category'}, ...]

Where each paper concept lives (the README's table has them all):
  scoring network ............ sparsity.ScoringNetwork
  top-rho token selection .... sparsity.select_top_rho / sparsity.scatter_kept
  DAM target ................. dam.attention_map / dam.dam_target
  encoder auxiliary heads .... model.SparseDETR.__call__ (aux_outputs_enc)
  top-k decoder queries ...... transformer.select_topk_queries
  deformable attention ....... deformable_attention.deformable_sample / MSDeformAttn
  official checkpoints ....... convert.load_official (and back: to_official.from_checkpoint)
  inference on images ........ detector.Detector (export.py: jax.export, ONNX (onnx_export.py), official .pth)
"""


def __getattr__(name: str):
  if name == "Detector":  # imported on first use: `import sparse_detr_jax.data` (grain workers) stays light
    from sparse_detr_jax.detector import Detector  # pylint: disable=import-outside-toplevel

    return Detector
  raise AttributeError(f"module 'sparse_detr_jax' has no attribute {name!r}")
