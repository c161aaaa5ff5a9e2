"""Deformable DETR, ResNet-50 backbone (a row of the paper's Table 1).

Official: python main.py
Published (COCO val2017, 50 epochs): AP 43.9, #Params 39.8M, GFLOPs 172.9G, B4FPS 19.1.
"""

from configs import common


def get_config():
  return common.row("resnet50", topk_bbr=False)
