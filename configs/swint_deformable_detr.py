"""Deformable DETR, Swin-T backbone (a row of the paper's Table 1).

Official: configs/swint_deformable_detr.sh (main.py --backbone swin-t)
Published (COCO val2017, 50 epochs): AP 45.7, #Params 40.3M, GFLOPs 180.4G, B4FPS 15.9.
"""

from configs import common


def get_config():
  return common.row("swin-t", topk_bbr=False)
