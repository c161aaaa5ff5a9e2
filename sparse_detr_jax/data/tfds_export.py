"""Write a COCO-format directory as a TFDS dataset (array_record) with the features of `coco/2017`.

    python -m sparse_detr_jax.data.tfds_export COCO_DIR DATA_DIR [--split train:train:annotations/instances_train.json ...]

Each split is NAME:IMAGE_DIR:ANNOTATION_JSON relative to COCO_DIR (defaults: the layout of
`sparse_detr_jax.data.shapes`). Read back with `data.source = 'tfds'`, `data.tfds_name = 'coco_format'`,
`data.tfds_data_dir = DATA_DIR`. Encoded images are stored as they are (no TensorFlow needed).
Category ids must be COCO's or 1..K, the two spaces TfdsSource maps labels back to.
"""
import argparse
import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from sparse_detr_jax.data import categories

DEFAULT_SPLITS = ("train:train:annotations/instances_train.json", "val:val:annotations/instances_val.json")


# Not registered: readers find the prepared dataset by name in its data_dir, without this class.
with tfds.core.registered.skip_registration():

  class CocoFormat(tfds.core.GeneratorBasedBuilder):
    """A COCO-format directory as TFDS records (image, image/filename, image/id, objects)."""
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, coco_dir: str, splits: dict[str, tuple[str, str]], **kwargs):
      self._coco_dir, self._splits = pathlib.Path(coco_dir), splits
      first = json.loads((self._coco_dir / next(iter(splits.values()))[1]).read_text())
      cats = sorted(first["categories"], key=lambda c: c["id"])
      self._names = [c["name"] for c in cats]
      ids = [int(c["id"]) for c in cats]
      if categories.label_ids(self._names) != ids:
        raise ValueError(f"category ids {ids} are neither COCO's (by name) nor 1..K")
      self._label = {i: k for k, i in enumerate(ids)}
      super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "image/filename": tfds.features.Text(),
          "image/id": np.int64,
          "objects": tfds.features.Sequence({
              "area": np.int64, "bbox": tfds.features.BBoxFeature(), "id": np.int64, "is_crowd": np.bool_,
              "label": tfds.features.ClassLabel(names=self._names)}),
      }))

    def _split_generators(self, dl_manager):
      return {name: self._generate_examples(*paths) for name, paths in self._splits.items()}

    def _generate_examples(self, image_dir: str, annotation_file: str):
      data = json.loads((self._coco_dir / annotation_file).read_text())
      anns: dict[int, list] = {}
      for a in data["annotations"]:
        anns.setdefault(int(a["image_id"]), []).append(a)
      for im in data["images"]:
        w, h = float(im["width"]), float(im["height"])
        objs = anns.get(int(im["id"]), [])
        bbox = [tfds.features.BBox(ymin=min(max(a["bbox"][1] / h, 0.0), 1.0), xmin=min(max(a["bbox"][0] / w, 0.0), 1.0),
                                   ymax=min(max((a["bbox"][1] + a["bbox"][3]) / h, 0.0), 1.0),
                                   xmax=min(max((a["bbox"][0] + a["bbox"][2]) / w, 0.0), 1.0)) for a in objs]
        yield int(im["id"]), {
            "image": (self._coco_dir / image_dir / im["file_name"]).read_bytes(),
            "image/filename": im["file_name"], "image/id": int(im["id"]),
            "objects": {"area": [int(a.get("area", 0)) for a in objs], "bbox": bbox,
                        "id": [int(a["id"]) for a in objs], "is_crowd": [bool(a.get("iscrowd", 0)) for a in objs],
                        "label": [self._label[int(a["category_id"])] for a in objs]}}


def export(coco_dir: str, data_dir: str, splits=DEFAULT_SPLITS) -> None:
  parsed = {}
  for s in splits:
    name, image_dir, ann = s.split(":")
    parsed[name] = (image_dir, ann)
  CocoFormat(coco_dir=coco_dir, splits=parsed, data_dir=data_dir, file_format="array_record").download_and_prepare()


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("coco_dir")
  p.add_argument("data_dir")
  p.add_argument("--split", action="append", help="NAME:IMAGE_DIR:ANNOTATION_JSON (repeatable)")
  a = p.parse_args(argv)
  export(a.coco_dir, a.data_dir, a.split or DEFAULT_SPLITS)
  print(f"wrote TFDS dataset 'coco_format' to {a.data_dir}")


if __name__ == "__main__":
  main()
