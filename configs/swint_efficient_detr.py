"""Deformable DETR + top-k & BBR (Efficient DETR init), Swin-T backbone (a row of the paper's Table 1).

Official: configs/swint_efficient_detr.sh
    (main.py --backbone swin-t --with_box_refine --two_stage --eff_query_init --eff_specific_head)
Published (COCO val2017, 50 epochs): AP 48.0, #Params 41.3M, GFLOPs 184.8G, B4FPS 15.4.
"""

from configs import common


def get_config():
  return common.row("swin-t", topk_bbr=True)
