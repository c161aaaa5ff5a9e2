"""Sparse DETR, rho = 0.1, ResNet-50 backbone (a row of the paper's Table 1).

Official: configs/r50_sparse_detr_rho_0.1.sh
    (main.py --with_box_refine --two_stage --eff_query_init --eff_specific_head --use_enc_aux_loss --rho 0.1)
Published (COCO val2017, 50 epochs): AP 45.3, #Params 40.9M, GFLOPs 105.4G, B4FPS 26.5.
"""

from configs import common


def get_config():
  return common.sparse_detr("resnet50", rho=0.1)
