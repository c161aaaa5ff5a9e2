"""Sparse DETR, rho = 0.1, Swin-T backbone (a row of the paper's Table 1).

Official: configs/swint_sparse_detr_rho_0.1.sh
    (main.py --backbone swin-t --with_box_refine --two_stage --eff_query_init --eff_specific_head
      --use_enc_aux_loss --rho 0.1)
Published (COCO val2017, 50 epochs): AP 48.2, #Params 41.4M, GFLOPs 113.4G, B4FPS 21.2.
"""

from configs import common


def get_config():
  return common.sparse_detr("swin-t", rho=0.1)
