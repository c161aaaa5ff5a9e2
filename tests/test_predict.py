"""predict.py and visualize.py: detections JSON and pictures for image files (upright by EXIF, bad files
reported), Sparse DETR's mechanism picture, TensorBoard pictures during training, a Detector from a run."""

import copy
import json
import pathlib
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from sparse_detr_jax import Detector, predict, trainer, visualize
from sparse_detr_jax import config as config_lib
from sparse_detr_jax import model as model_lib
from sparse_detr_jax.data import pipeline, shapes, sources


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes")
  shapes.generate(str(root), 4, 4, seed=0)
  cfg = config_lib.load_config_file(str(ROOT / "configs" / "shapes_tiny.py"))
  cfg.data.coco_dir = str(root)
  cfg.model.update(backbone="small_convnet", num_feature_levels=4)
  cfg.data.update(scales=[48, 64], max_size=64, val_size=64, buckets=[(64, 64)])
  model = model_lib.build_model(cfg.model)
  return root, cfg, model, model_lib.init_variables(model, jax.random.PRNGKey(0))


def test_predict_writes_detections_and_pictures(setup, tmp_path):
  root, cfg, model, variables = setup
  val = sorted((root / "val").glob("*.jpg"))[:2]
  upright = tmp_path / "rotated.jpg"  # stored 60x40, displayed 40x60 (EXIF orientation 6)
  img = Image.fromarray(np.full((40, 60, 3), 128, np.uint8))
  exif = Image.Exif()
  exif[sources.EXIF_ORIENTATION] = 6
  img.save(upright, exif=exif.tobytes())
  broken = tmp_path / "broken.jpg"  # a valid header, then half of the scan data
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3)).astype(np.uint8)).save(broken)
  broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
  notes = tmp_path / "notes.jpg"  # not an image at all: an entry with its error, the others still run
  notes.write_text("not an image")
  paths = [str(p) for p in val] + [str(upright), str(broken), str(notes)]
  names = {c["id"]: c["name"] for c in shapes.CATEGORIES}
  detector = Detector.from_model(model, variables, cfg.data, batch_size=2, names=names)
  predict.predict(detector, paths, str(tmp_path / "out"), threshold=0.0, mechanism=True)
  saved = json.loads((tmp_path / "out" / "detections.json").read_text())
  assert [r["file"] for r in saved] == paths
  assert "notes.jpg: not a readable image" in saved[4]["error"] and "detections" not in saved[4]
  assert (saved[2]["width"], saved[2]["height"]) == (40, 60) and "cannot decode image" in saved[3]["error"]
  for r in saved[:3]:
    assert len(r["detections"]) == 10 * 6  # threshold 0: every (query, class) pair of the 6 categories, best first
    scores = [d["score"] for d in r["detections"]]
    assert scores == sorted(scores, reverse=True)
    for d in r["detections"]:
      x0, y0, x1, y1 = d["box"]
      assert d["category"] == names[d["category_id"]]  # never the unused id 0
      assert 0 <= x0 <= x1 <= r["width"] and 0 <= y0 <= y1 <= r["height"]  # clipped to the image
    with Image.open(r["picture"]) as picture, Image.open(r["mechanism_picture"]) as mechanism:
      assert picture.size == (r["width"], r["height"])
      assert 2 * visualize.MIN_TILE_SIDE <= max(mechanism.size) <= visualize.MAX_PICTURE_SIDE  # enlarged to read
  assert "picture" not in saved[3]
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    sources.ImageFiles([str(tmp_path / "missing.jpg")])


def test_token_maps_follow_the_selection(setup):
  root, cfg, model, variables = setup
  batch = pipeline.eval_dataset(sources.build_source(cfg.data, "val"), cfg.data, 2)[0]
  out = jax.jit(model.apply)(variables, batch["image"], batch["padding_mask"])
  kept_flat, attention_flat = visualize.token_maps(out)
  shapes = [tuple(s) for s in out["spatial_shapes"]]
  for slot in range(2):
    kept, attention = (visualize.level_grids(np.asarray(m[slot]), shapes) for m in (kept_flat, attention_flat))
    h, w = batch["size"][slot]
    assert [k.shape for k in kept] == [a.shape for a in attention] == shapes
    assert sum(int(k.sum()) for k in kept) == int(out["sparse_token_nums"][slot])
    assert all((a >= 0).all() for a in attention) and sum(float(a.sum()) for a in attention) > 0
    view = visualize.model_view(batch, slot)
    assert view.shape == (h, w, 3) and view.dtype == np.uint8
    tiles = visualize.mechanism_tiles(view, (64, 64), kept, attention, 4000, 4000)
    top_left = np.asarray(tiles[0][0])  # level 0, kept tokens highlighted in yellow
    zoom = visualize.MIN_TILE_SIDE // max(h, w)
    assert top_left.shape == (h * zoom, w * zoom, 3)
    yellowish = (top_left[..., 0] > 150) & (top_left[..., 1] > 150) & (top_left[..., 2] < 120)
    cells = kept[0].repeat(8 * zoom, 0).repeat(8 * zoom, 1)[: h * zoom, : w * zoom]
    assert yellowish[cells].mean() > 0.9 and yellowish[~cells].mean() < 0.05
    assert max(visualize.mechanism_picture(view, (64, 64), kept, attention, max_side=500).size) <= 500


def event_images(logdir: pathlib.Path) -> set[str]:
  """Tags of the image summaries in a TensorBoard event directory (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2

  tags = set()
  for path in logdir.glob("events.out.tfevents.*"):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      tags |= {v.tag for v in event.summary.value if v.HasField("image")}
  return tags


def test_training_writes_tensorboard_pictures(setup, tmp_path):
  root, cfg, _, _ = setup
  cfg = copy.deepcopy(cfg)
  cfg.data.update(train_images="val", train_annotations="annotations/instances_val.json", num_workers=0)
  cfg.train.update(batch_size=1, max_steps=2, picture_every_steps=2, checkpoint_every=2, eval_at_end=False)
  trainer.train(cfg, str(tmp_path))
  assert event_images(tmp_path) == {"pictures/detections", "pictures/mechanism"}
  # A Detector from the run (its config from the workdir) and from the step directory give the same.
  image = np.asarray(sources.ImageFiles([str(sorted((root / "val").glob("*.jpg"))[0])]).image(0))
  from_run = Detector.from_checkpoint(str(tmp_path))(image, threshold=0.0)
  from_step = Detector.from_checkpoint(str(tmp_path / "checkpoints" / "2"))(image, threshold=0.0)
  assert len(from_run) == 10 * 6 and from_run == from_step  # every (query, class) pair of the run's 6 categories


def test_folders_stand_for_their_images_and_usage_errors_write_nothing(tmp_path):
  (tmp_path / "b.png").write_bytes(b"")
  (tmp_path / "a.JPG").write_bytes(b"")
  (tmp_path / "notes.txt").write_text("")
  assert predict.expand([str(tmp_path), "x.jpg"]) == [str(tmp_path / "a.JPG"), str(tmp_path / "b.png"), "x.jpg"]
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="a folder without image files"):
    predict.expand([str(tmp_path / "empty")])
  run = subprocess.run(
    [sys.executable, "-m", "sparse_detr_jax.predict", "--checkpoint=x.pth", "--threshold=2",
     f"--out={tmp_path / 'out'}", str(tmp_path)],
    cwd=ROOT, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert run.returncode == 2 and "--threshold: expected a score in [0, 1], got 2.0" in run.stderr, run.stderr
  assert not (tmp_path / "out").exists()


def test_labels_stay_readable_on_a_small_crowded_picture():
  """30 overlapping detections on a 140x200 picture: every box drawn, labels only where they cover no other label
  (the best detection's first), inside the picture."""
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 120, (30, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(10, 60, (30, 2))], 1).clip(0, [200, 140, 200, 140])
  scores, labels = rng.uniform(0.3, 1.0, 30), rng.integers(1, 4, 30)
  names = {1: "circle", 2: "square", 3: "triangle"}
  image = np.full((140, 200, 3), 255, np.uint8)
  text_font = visualize.font(140)
  draw = visualize.ImageDraw.Draw(Image.fromarray(image))
  texts = [f"{names[int(c)]} {s:.2f}" for c, s in zip(labels, scores, strict=True)]
  sizes = [draw.textbbox((0, 0), t, font=text_font)[2:] for t in texts]
  places = visualize.label_places(boxes, sizes, scores, (200, 140))
  assert places[0][0] == int(np.argmax(scores)) and 1 < len(places) < 30
  for i, (_, a) in enumerate(places):
    assert 0 <= a[0] and a[2] <= 200 and 0 <= a[1] and a[3] <= 140
    for _, b in places[i + 1 :]:
      assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]  # no two labels overlap
  picture = np.asarray(visualize.draw_detections(image, boxes, labels, scores, names))
  assert picture.shape == image.shape and (picture != 255).any(-1).mean() < 0.6  # boxes and a few labels
