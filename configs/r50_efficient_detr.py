"""Deformable DETR + top-k & BBR (Efficient DETR init), ResNet-50 backbone (a row of the paper's Table 1).

Official: configs/r50_efficient_detr.sh (main.py --with_box_refine --two_stage --eff_query_init --eff_specific_head)
Published (COCO val2017, 50 epochs): AP 46.0, #Params 40.8M, GFLOPs 177.3G, B4FPS 18.2.
"""

from configs import common


def get_config():
  return common.row("resnet50", topk_bbr=True)
