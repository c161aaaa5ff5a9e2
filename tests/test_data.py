"""Input pipeline: generated dataset, sources, official transforms, buckets, loaders and bad input."""

import hashlib
import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from sparse_detr_jax import config as config_lib
from sparse_detr_jax.data import batching, pipeline, shapes, sources, transforms

SMALL = dict(
  scales=[96, 128, 160],
  max_size=256,
  crop_resize=[96, 128],
  crop_size=(64, 96),
  val_size=128,
  buckets=[(128, 192), (192, 128), (160, 256), (256, 160), (176, 176)],
  max_boxes=6,
)


def data_cfg(root, **kw):
  return config_lib.data_config(
    coco_dir=str(root),
    train_images="train",
    val_images="val",
    train_annotations="annotations/instances_train.json",
    val_annotations="annotations/instances_val.json",
    **{**SMALL, **kw},
  )


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes")
  shapes.main([str(root), "--train", "24", "--val", "6", "--seed", "3"])
  return root


def digest(root: pathlib.Path) -> str:
  h = hashlib.sha256()
  for p in sorted(root.rglob("*")):
    if p.is_file():
      h.update(p.name.encode() + p.read_bytes())
  return h.hexdigest()


def test_shapes_layout_and_determinism(shapes_dir, tmp_path):
  ann = json.loads((shapes_dir / "annotations" / "instances_train.json").read_text())
  assert len(ann["images"]) == 24 and len(ann["categories"]) == len(shapes.CATEGORIES)
  sizes = {(im["width"], im["height"]) for im in ann["images"]}
  assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)  # both orientations
  for a in ann["annotations"]:
    im = next(i for i in ann["images"] if i["id"] == a["image_id"])
    x, y, w, h = a["bbox"]
    assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"] and w > 0
  shapes.generate(str(tmp_path / "again"), 24, 6, seed=3)
  assert digest(tmp_path / "again") == digest(shapes_dir)
  shapes.generate(str(tmp_path / "other"), 24, 6, seed=4)
  assert digest(tmp_path / "other") != digest(shapes_dir)


def test_resize_rule_matches_official_formula():
  # get_size_with_aspect_ratio: (w, h) = (640, 480) at 800 / 1333 -> (800, 1066); elongated capped.
  assert transforms.resized_hw(480, 640, 800, 1333) == (800, 1066)
  assert transforms.resized_hw(640, 480, 800, 1333) == (1066, 800)
  assert transforms.resized_hw(300, 1200, 800, 1333) == (333, 1332)
  assert transforms.resized_hw(100, 1000, 800, 1333) == (133, 1330)
  assert transforms.resized_hw(800, 900, 800, 1333) == (800, 900)  # already at size: unchanged
  assert transforms.resized_hw(500, 400, 600, None) == (750, 600)


def test_flip_crop_resize_boxes():
  img = np.zeros((100, 200, 3), np.uint8)
  ann = sources.Annotations(np.array([[10, 20, 50, 60], [150, 0, 200, 10]], np.float32), np.array([1, 2], np.int32))
  out, a = transforms.apply(img, ann, [("hflip",)])
  np.testing.assert_array_equal(a.boxes, [[150, 20, 190, 60], [0, 0, 50, 10]])
  out, a = transforms.apply(img, ann, [("crop", (15, 5, 50, 100))])  # top, left, h, w
  assert out.shape == (50, 100, 3)
  np.testing.assert_array_equal(a.boxes, [[5, 5, 45, 45]])  # the second box falls outside: dropped
  np.testing.assert_array_equal(a.labels, [1])
  out, a = transforms.apply(img, ann, [("resize", (50, 400))])
  np.testing.assert_allclose(a.boxes[0], [20, 10, 100, 30])
  x, cxcywh = transforms.normalize(out, a)
  np.testing.assert_allclose(cxcywh[0], [60 / 400, 20 / 50, 80 / 400, 20 / 50], rtol=1e-6)


def test_train_batches_static_and_deterministic(shapes_dir):
  d = data_cfg(shapes_dir)
  src = sources.build_source(d, "train")
  ds = pipeline.train_dataset(src, d, global_batch=4, seed=0, num_batches=8)
  spec = pipeline.data_spec(d)
  seen = set()
  for k in range(len(ds)):
    b = ds[k]
    hh, ww = b["image"].shape[1:3]
    assert (hh, ww) in spec.buckets
    for i in range(4):
      h, w = b["size"][i]
      assert not b["padding_mask"][i, :h, :w].any() and b["padding_mask"][i].sum() == hh * ww - h * w
      assert not b["image"][i, h:].any() and not b["image"][i, :, w:].any()
      v = b["box_valid"][i]
      assert (b["boxes"][i][v] > 0).all() and (b["boxes"][i][v] <= 1).all()
      seen.add(int(b["image_id"][i]))
  assert len(seen) > 12  # batches 0..5 are one epoch of distinct images, 6..7 start the next
  again = pipeline.train_dataset(src, d, global_batch=4, seed=0, num_batches=8)
  other = pipeline.train_dataset(src, d, global_batch=4, seed=1, num_batches=8)
  for k in (0, 7):
    assert all(np.array_equal(ds[k][key], again[k][key]) for key in ds[k])
  assert not all(np.array_equal(ds[0]["image_id"], other[k]["image_id"]) for k in range(2))


def test_hosts_split_each_global_batch(shapes_dir):
  d = data_cfg(shapes_dir)
  src = sources.build_source(d, "train")
  whole = pipeline.train_dataset(src, d, 4, seed=0, num_batches=3)
  parts = [pipeline.train_dataset(src, d, 4, seed=0, num_batches=3, process_index=p, process_count=2) for p in range(2)]
  for k in range(3):
    for key in whole[k]:
      np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])


def test_workers_and_resume_state(shapes_dir):
  d = data_cfg(shapes_dir)
  ds = pipeline.train_dataset(sources.build_source(d, "train"), d, 4, seed=0, num_batches=6)
  it = pipeline.iterate(ds, num_workers=2)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  rest = [next(it) for _ in range(3)]
  resumed = pipeline.iterate(ds, num_workers=2)
  resumed.set_state(state)
  for k, b in enumerate([first[0]] + rest):
    ref = ds[0] if k == 0 else rest[k - 1]
    got = b if k == 0 else next(resumed)
    assert all(np.array_equal(ref[key], got[key]) for key in ref)
  assert all(np.array_equal(first[0][key], ds[0][key]) for key in ds[0])


def test_eval_covers_every_image_once(shapes_dir):
  d = data_cfg(shapes_dir)
  src = sources.build_source(d, "val")
  ds = pipeline.eval_dataset(src, d, global_batch=4)
  ids = np.concatenate([ds[k]["image_id"] for k in range(len(ds))])
  assert sorted(ids[ids >= 0]) == sorted(src.image_ids)
  b = ds[0]
  i = int(np.flatnonzero(b["image_id"] >= 0)[0])
  assert min(b["size"][i]) == 128 or max(b["size"][i]) == 256  # val resize: shorter 128, longer <= 256


def test_tfds_source_feeds_identical_batches(shapes_dir, tmp_path):
  from sparse_detr_jax.data import tfds_export

  tfds_export.main([str(shapes_dir), str(tmp_path / "tfds")])
  d = data_cfg(shapes_dir)
  t = data_cfg(
    shapes_dir, source="tfds", tfds_name="coco_format", tfds_data_dir=str(tmp_path / "tfds"), tfds_val_split="val"
  )
  for split in ("train", "val"):
    a, b = sources.build_source(d, split), sources.build_source(t, split)
    np.testing.assert_array_equal(a.image_ids, b.image_ids)
    np.testing.assert_array_equal(a.sizes, b.sizes)
  a = pipeline.train_dataset(sources.build_source(d, "train"), d, 4, seed=0, num_batches=3)
  b = pipeline.train_dataset(sources.build_source(t, "train"), t, 4, seed=0, num_batches=3)
  for k in range(3):
    for key in a[k]:
      if key == "boxes":  # TFDS stores normalised float32 boxes: float rounding only
        np.testing.assert_allclose(a[k][key], b[k][key], atol=1e-6)
      else:
        np.testing.assert_array_equal(a[k][key], b[k][key], err_msg=key)


# ---------------------------------------------------------------- bad input


def write_coco(
  root: pathlib.Path,
  images: dict[str, Image.Image | bytes | None],
  anns: dict[str, list],
  sizes: dict[str, tuple[int, int]] | None = None,
) -> pathlib.Path:
  (root / "train").mkdir(parents=True)
  (root / "annotations").mkdir()
  js = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
  for k, (name, img) in enumerate(images.items()):
    if isinstance(img, Image.Image):
      img.save(root / "train" / name, **({"exif": img.info["exif"]} if "exif" in img.info else {}))
    elif isinstance(img, bytes):
      (root / "train" / name).write_bytes(img)
    w, h = (sizes or {}).get(name, (64, 48))
    js["images"].append({"id": k + 1, "file_name": name, "width": w, "height": h})
    for box in anns.get(name, []):
      js["annotations"].append(
        {
          "id": len(js["annotations"]) + 1,
          "image_id": k + 1,
          "category_id": 1,
          "bbox": box[:4],
          "iscrowd": box[4] if len(box) > 4 else 0,
          "area": 1,
        }
      )
  (root / "annotations" / "instances_train.json").write_text(json.dumps(js))
  return root


def exif_rotated(w: int, h: int) -> Image.Image:
  img = Image.fromarray(np.full((h, w, 3), 128, np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 on display
  img.info["exif"] = exif.tobytes()
  return img


def test_image_modes_decode_to_rgb(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
  good = Image.fromarray(rgb)
  images = {
    "gray.png": good.convert("L"),
    "rgba.png": good.convert("RGBA"),
    "cmyk.jpg": good.convert("CMYK"),
    "p.png": good.convert("P"),
    "deep.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),  # 16-bit grayscale
    "rotated_raw.jpg": exif_rotated(64, 48),
    "rotated_used.jpg": exif_rotated(48, 64),
  }
  src = sources.CocoSource(
    write_coco(tmp_path, images, {}, {"rotated_used.jpg": (64, 48)}) / "train",
    tmp_path / "annotations" / "instances_train.json",
  )
  by_name = {im["file_name"]: i for i, im in enumerate(src._images)}
  for name in images:
    x = src.image(by_name[name])
    assert x.dtype == np.uint8 and x.shape == (48, 64, 3), name
  np.testing.assert_array_equal(src.image(by_name["deep.png"])[..., 0], rgb[..., 0])  # 16-bit scaled to 8
  np.testing.assert_array_equal(src.image(by_name["gray.png"])[..., 1], np.asarray(good.convert("L")))


def test_bad_samples_are_counted_not_fatal(tmp_path, caplog):
  ok = Image.fromarray(np.full((48, 64, 3), 90, np.uint8))
  buf = io.BytesIO()
  ok.save(buf, format="JPEG")
  images = {
    "ok.jpg": ok,
    "corrupt.jpg": b"not an image at all",
    "truncated.jpg": buf.getvalue()[:200],
    "wrong_size.jpg": ok,
    "empty.jpg": ok,
    "missing.jpg": None,
    "boxes.jpg": ok,
  }
  anns = {
    "ok.jpg": [[5, 5, 20, 20]],
    "corrupt.jpg": [[1, 1, 5, 5]],
    "boxes.jpg": [
      [10, 10, 0, 20],
      [50, 40, 40, 40],
      [-10, -10, 5, 5],
      [70, 5, 10, 10],
      [1, 1, 10, 10, 1],
      [2, 2, 10, 10],
    ],
  }
  root = write_coco(tmp_path, images, anns, {"wrong_size.jpg": (80, 48)})
  src = sources.CocoSource(root / "train", root / "annotations" / "instances_train.json")
  no_area = "box without area inside its image (dropped, as the official code drops it)"
  assert src.skipped == {"image file missing": 1, no_area: 3} and len(src) == 6  # zero width, outside, clipped away
  assert (src.skipped_images, src.skipped_annotations, src.crowd_boxes) == (1, 3, 1)
  by_name = {im["file_name"]: i for i, im in enumerate(src._images)}
  # Zero width, crowd, fully outside (after clipping) removed; partly outside clipped.
  a = src.annotations(by_name["boxes.jpg"])
  np.testing.assert_array_equal(a.boxes, [[50, 40, 64, 48], [2, 2, 12, 12]])
  assert len(src.annotations(by_name["empty.jpg"]).labels) == 0
  for bad in ("corrupt.jpg", "truncated.jpg", "wrong_size.jpg"):
    with pytest.raises(sources.SampleError, match=bad):
      src.image(by_name[bad])
  d = config_lib.data_config(
    **{**SMALL, "buckets": [(128, 192), (192, 128), (256, 256)]},
    coco_dir=str(root),
    train_images="train",
    train_annotations="annotations/instances_train.json",
  )
  ds = pipeline.eval_dataset(src, d, global_batch=6)
  batches = [ds[k] for k in range(len(ds))]
  skipped = sum(int(b["skipped"].sum()) for b in batches)
  assert skipped == 3 and "cannot decode" in caplog.text
  for b in batches:
    for i in np.flatnonzero(b["skipped"]):
      assert not b["box_valid"][i].any() and not b["image"][i].any()


def test_annotation_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json"):
    sources.CocoSource(tmp_path, tmp_path / "nope.json")
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
    sources.CocoSource(tmp_path, tmp_path / "bad.json")
  (tmp_path / "partial.json").write_text(json.dumps({"images": []}))
  with pytest.raises(ValueError, match="'annotations'"):
    sources.CocoSource(tmp_path, tmp_path / "partial.json")
  (tmp_path / "noid.json").write_text(
    json.dumps({"images": [{"file_name": "a.jpg"}], "annotations": [], "categories": []})
  )
  with pytest.raises(ValueError, match=r"images\[0\] lacks \['id', 'width', 'height'\]"):
    sources.CocoSource(tmp_path, tmp_path / "noid.json")


def test_config_errors():
  with pytest.raises(ValueError, match="cannot hold a 256x160"):
    pipeline.data_spec(config_lib.data_config(**{**SMALL, "buckets": [(160, 256), (192, 192)]}))
  with pytest.raises(ValueError, match="crop_size"):
    pipeline.data_spec(config_lib.data_config(**{**SMALL, "crop_size": (200, 300)}))
  with pytest.raises(ValueError, match="data.source"):
    sources.build_source(config_lib.data_config(source="s3"), "train")
  with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
    sources.build_source(config_lib.data_config(coco_dir="/nonexistent"), "train")


def test_group_batches_buckets_and_leftovers():
  buckets = batching.check_buckets([(10, 10), (10, 20), (20, 20)], 10, 20)
  hw = np.array([[10, 10]] * 5 + [[10, 20]] * 2 + [[20, 20]])
  train = batching.group_batches(np.arange(8), hw, buckets, 4, drop_remainder=True)
  assert [(b.bucket, list(b.indices)) for b in train] == [(0, [0, 1, 2, 3]), (2, [7, 5, 6, 4])]
  ev = batching.group_batches(np.arange(8), hw, buckets, 3, drop_remainder=False)
  got = sorted(i for b in ev for i in b.indices if i >= 0)
  assert got == list(range(8))
  for b in ev:
    bh, bw = buckets[b.bucket]
    assert all(hw[i][0] <= bh and hw[i][1] <= bw for i in b.indices if i >= 0)


def test_category_ids_the_class_heads_cannot_predict_are_refused(tmp_path):
  root = write_coco(tmp_path, {"a.png": Image.new("RGB", (64, 48))}, {"a.png": [[1, 1, 10, 10]]})
  ann = root / "annotations" / "instances_train.json"
  js = json.loads(ann.read_text())
  js["categories"] = [{"id": 1, "name": "thing"}, {"id": 9, "name": "other"}]
  js["annotations"][0]["category_id"] = 12  # used by an annotation, absent from the categories: named
  ann.write_text(json.dumps(js))
  with pytest.raises(ValueError, match=r"annotations\[0\] \(id 1\) has category_id 12, which is not in 'categories'"):
    sources.CocoSource(root / "train", ann)
  js["categories"].append({"id": 12, "name": "third"})
  ann.write_text(json.dumps(js))
  src = sources.CocoSource(root / "train", ann)
  sources.check_classes(src, 13)
  with pytest.raises(ValueError, match=r"instances_train.json: category id 12 >= model.num_classes = 7: .*=13"):
    sources.check_classes(src, 7)
