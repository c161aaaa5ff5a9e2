"""detector.Detector on the official fixture checkpoints: the jitted model + official post-processing on the
evaluation transform, clipped boxes, any sizes and counts, one compiled function per canvas, bad input."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, load_npz, official
from PIL import Image, ImageOps

from sparse_detr_jax import Detector, convert, postprocess
from sparse_detr_jax import config as config_lib
from sparse_detr_jax import detector as detector_lib
from sparse_detr_jax.data import batching, categories, sources, transforms
from sparse_detr_jax.data.sources import Annotations

CANVASES = ((48, 64), (64, 48), (64, 64))


def tiny_config():
  """Small CPU settings: shorter side 48, longer side at most 64, three canvases."""
  cfg = config_lib.load_config_file(str(ROOT / "configs" / "shapes_tiny.py"))
  cfg.data.update(scales=(48,), val_size=48, max_size=64, buckets=CANVASES)
  return cfg


def fixture_images(name: str) -> list[np.ndarray]:
  """The fixture's images as uint8 RGB (h, w, 3), unpadded."""
  d = load_npz(name)
  mean, std = transforms.IMAGENET_MEAN, transforms.IMAGENET_STD
  out = []
  for x, (h, w) in zip(d["images"], d["image_sizes"], strict=True):
    rgb = np.transpose(x[:, :h, :w], (1, 2, 0)) * std + mean
    out.append(np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8))
  return out


@pytest.fixture(scope="module", params=["tiny_sparse", "tiny_deformable"])
def named_detector(request):
  """(fixture name, its Detector): rho 0.2 and rho 0 (every token kept)."""
  return request.param, Detector.from_checkpoint(str(official(request.param + ".pth")), tiny_config(), batch_size=2)


@pytest.fixture()
def detector(named_detector):
  return named_detector[1]


def reference(path: str, images: list[np.ndarray], cfg) -> list[dict]:
  """The official way, written out: evaluation transform, padding to the smallest canvas, the jitted model,
  official post-processing over the model's categories (COCO's, for an official checkpoint); then the top
  detections' boxes clipped to each image."""
  model, variables, _ = convert.load_official(path)
  spec = cfg.data
  sizes = [transforms.output_hw(transforms.plan_eval(*x.shape[:2], spec), *x.shape[:2]) for x in images]
  canvas = spec.buckets[batching.smallest_bucket(np.array(sizes), list(spec.buckets)).max()]
  batch = np.zeros((len(images), *canvas, 3), np.float32)
  padding = np.ones((len(images), *canvas), bool)
  for i, (x, (h, w)) in enumerate(zip(images, sizes, strict=True)):
    empty = Annotations(np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
    pixels, _ = transforms.apply(x, empty, transforms.plan_eval(*x.shape[:2], spec))
    batch[i, :h, :w] = transforms.normalize(pixels, empty)[0]
    padding[i, :h, :w] = False
  out = jax.jit(model.apply)(variables, batch, padding)
  orig = np.array([x.shape[:2] for x in images], np.int32)
  # An official model's label map is COCO's 80 categories: the top detections over them.
  det = jax.tree.map(np.asarray, postprocess.postprocess(out, orig, class_ids=list(categories.COCO_CATEGORIES)))
  coco = np.isin(det["labels"], list(categories.COCO_CATEGORIES))  # all of them: 40 queries x 80 > 100
  return [
    {
      "scores": det["scores"][i][coco[i]],
      "labels": det["labels"][i][coco[i]],
      "boxes": detector_lib.clip_xyxy(det["boxes"][i][coco[i]], *orig[i]),
    }
    for i in range(len(images))
  ]


def test_equals_jitted_model_and_official_postprocessing(named_detector):
  name, detector = named_detector
  images = fixture_images(name)  # (48, 64) and (40, 52): both on the 48x64 canvas
  found = detector(images, threshold=0.0)
  for got, want in zip(found, reference(str(official(name + ".pth")), images, tiny_config()), strict=True):
    assert len(got) == len(want["scores"]) == postprocess.NUM_DETECTIONS
    np.testing.assert_array_equal([d["score"] for d in got], want["scores"])
    np.testing.assert_array_equal([d["category_id"] for d in got], want["labels"])
    np.testing.assert_array_equal(np.array([d["box"] for d in got], np.float32), want["boxes"])


def test_any_sizes_counts_and_kinds(detector, tmp_path):
  rng = np.random.default_rng(0)
  sizes = [(300, 400), (400, 300), (1, 1), (20, 500), (64, 64)]
  images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]
  found = detector(images, threshold=0.0)
  assert len(found) == len(images)
  for x, dets in zip(images, found, strict=True):
    boxes = np.array([d["box"] for d in dets])
    h, w = x.shape[:2]
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert all(d["category"] == detector.name(d["category_id"]) for d in dets)
    scores = [d["score"] for d in dets]
    assert scores == sorted(scores, reverse=True)
  # Each image on its own canvas: one image, a PIL image, an (N, H, W, 3) batch give what the list gave.
  assert detector(images[1], threshold=0.0) == found[1]
  assert detector(Image.fromarray(images[0]), threshold=0.0) == found[0]
  assert detector(np.stack([images[0]] * 3), threshold=0.0) == [found[0]] * 3
  assert detector(images[0], threshold=1.0) == []
  # Paths, one or a list, and an EXIF-rotated photo: read upright, as the command line reads them.
  Image.fromarray(images[1]).save(tmp_path / "portrait.png")
  assert detector(str(tmp_path / "portrait.png"), threshold=0.0) == found[1]
  assert detector([tmp_path / "portrait.png"], threshold=0.0) == [found[1]]
  sideways = Image.fromarray(np.ascontiguousarray(np.rot90(images[1], 1)))  # stored turned; EXIF 6 turns it back
  exif = Image.Exif()
  exif[0x0112] = 6
  sideways.save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=100)
  upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "photo.jpg")).convert("RGB"))
  assert upright.shape == images[1].shape
  assert detector(Image.open(tmp_path / "photo.jpg"), threshold=0.0) == detector(upright, threshold=0.0)
  assert detector(tmp_path / "photo.jpg", threshold=0.0) == detector(upright, threshold=0.0)
  with pytest.raises(FileNotFoundError, match="image: no such image file"):
    detector(tmp_path / "nope.jpg")
  (tmp_path / "notes.txt").write_text("not an image")
  with pytest.raises(ValueError, match=r"images\[0\]: cannot read .*notes.txt as an image"):
    detector([tmp_path / "notes.txt"])
  # One compiled function per canvas used, kept across calls.
  compiled = dict(detector._run._compiled)
  assert set(compiled) == {(48, 64), (64, 48)}  # landscape and portrait; (64, 64) unused
  detector(images, threshold=0.5)
  assert all(detector._run._compiled[c] is compiled[c] for c in compiled)


def test_mechanism_picture(detector):
  image = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
  picture = detector.mechanism(image)
  assert picture.mode == "RGB" and max(picture.size) <= 2000
  assert 2.2 < picture.width / picture.height < 2.7  # four 4:3 levels side by side, two rows, titles
  small = detector.mechanism(image, max_side=600)
  assert max(small.size) <= 600


@pytest.mark.parametrize(
  ("images", "error", "match"),
  [
    ([], ValueError, "images: the list is empty"),
    (np.zeros((8, 8, 3), np.float32), ValueError, "image: expected dtype uint8"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 4), np.uint8)], ValueError, r"images\[1\]: expected shape"),
    ([np.zeros((8, 8), np.uint8)], ValueError, r"images\[0\]: expected shape \(H, W, 3\)"),
    (np.zeros((0, 8, 3), np.uint8), ValueError, "image: the image is empty"),
    (np.zeros((2, 3), np.uint8), ValueError, r"images: expected \(H, W, 3\) or \(N, H, W, 3\)"),
    (["photo.jpg"], FileNotFoundError, r"images\[0\]: no such image file photo.jpg"),
    ("photo.jpg", FileNotFoundError, "image: no such image file photo.jpg"),
    ([b"\xff\xd8"], TypeError, r"images\[0\]: expected a numpy array"),
    (7, TypeError, "images: expected an image or a list of images"),
  ],
)
def test_bad_input_names_the_argument(detector, images, error, match):
  with pytest.raises(error, match=match):
    detector(images)


def test_bad_threshold_and_detections_types_name_the_argument(detector):
  image = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(TypeError, match="threshold: expected a number in"):
    detector(image, threshold="0.5")
  with pytest.raises(TypeError, match="detections: expected this Detector's list"):
    detector.draw(image, "cat")
  with pytest.raises(ValueError, match="detections: every detection needs 'box'"):
    detector.draw(image, [{"box": [0, 0, 1], "category_id": 1, "score": 0.5}])
  assert detector.draw(image, []).size == (8, 8)


def test_bad_threshold_and_paths(detector, tmp_path):
  with pytest.raises(ValueError, match="threshold"):
    detector(np.zeros((8, 8, 3), np.uint8), threshold=1.5)
  with pytest.raises(FileNotFoundError, match="expected an official .pth"):
    Detector.from_checkpoint(str(tmp_path))
  with pytest.raises(ValueError, match="batch_size"):
    Detector(lambda *args: None, tiny_config().data, {}, batch_size=0)


def test_photos_of_any_mode_read_as_training_reads_them_and_folders_and_urls_are_named(detector, tmp_path):
  """A 16-bit grey PNG is scaled to 8 bits (not clipped to white), transparency is composited over white, as the
  data pipeline reads them; a folder or a URL is named as such."""
  rng = np.random.default_rng(2)
  grey = rng.integers(0, 256, (48, 64), dtype=np.uint16)
  Image.fromarray(grey * 257).save(tmp_path / "deep.png")
  with Image.open(tmp_path / "deep.png") as deep:
    assert deep.mode == "I;16"
  want = detector(np.repeat(grey.astype(np.uint8)[..., None], 3, -1), threshold=0.0)
  assert detector(tmp_path / "deep.png", threshold=0.0) == want
  rgba = rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)
  Image.fromarray(rgba).save(tmp_path / "clear.png")
  alpha = rgba[..., 3:].astype(np.float64) / 255
  over_white = np.round(rgba[..., :3] * alpha + 255 * (1 - alpha))
  with Image.open(tmp_path / "clear.png") as clear:
    got = sources.to_rgb(clear)
  assert np.abs(got.astype(np.int64) - over_white).max() <= 1  # PIL's integer compositing rounds
  assert detector(tmp_path / "clear.png", threshold=0.0) == detector(got, threshold=0.0)
  with pytest.raises(IsADirectoryError, match=r"image: .* is a folder; give its image files"):
    detector(tmp_path)
  with pytest.raises(ValueError, match="is a URL; this library reads local files only"):
    detector("https://example.com/photo.jpg")


def test_detections_are_of_the_label_maps_categories(tmp_path):
  """An official checkpoint's names are COCO's, whatever the config; detections are of its 80 categories only.
  A label file gives the names (and so the categories); a Detector without a label map reports every id as
  'class N'."""
  path = str(official("tiny_sparse.pth"))
  image = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
  coco = Detector.from_checkpoint(path, tiny_config())
  assert coco.names == categories.COCO_CATEGORIES
  found = coco(image, threshold=0.0)
  assert found and all(d["category"] == categories.COCO_CATEGORIES[d["category_id"]] for d in found)
  (tmp_path / "labels.json").write_text(categories.as_json({1: "cat", 5: "dog"}))
  mine = Detector.from_checkpoint(path, tiny_config(), labels=tmp_path / "labels.json")
  named = mine(image, threshold=0.0)
  assert len(named) == 40 * 2 and {d["category"] for d in named} == {"cat", "dog"}  # every query, both classes
  unnamed = Detector.from_model(coco.model, coco.variables, tiny_config().data)  # no label map
  ids = {d["category_id"] for d in unnamed(image, threshold=0.0)}
  assert ids - set(categories.COCO_CATEGORIES)  # the unused ids too, named by number
  assert all(d["category"] == f"class {d['category_id']}" for d in unnamed(image, threshold=0.0))


SECOND_PROCESS = """
import sys, jax, numpy as np
from test_detector import tiny_config
from sparse_detr_jax import Detector
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
detector = Detector.from_checkpoint(sys.argv[1], tiny_config())
detector(np.zeros((48, 64, 3), np.uint8))
print(events.count("/jax/compilation_cache/cache_hits"), events.count("/jax/compilation_cache/cache_misses"))
"""


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
  """Detector turns on JAX's persistent compilation cache (here in a fresh directory): the same detection in a
  second process compiles nothing."""
  env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "JAX_COMPILATION_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin"}
  cmd = [sys.executable, "-c", SECOND_PROCESS, str(official("tiny_sparse.pth"))]
  runs = [subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300) for _ in range(2)]
  assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-3000:]
  (hits_1, misses_1), (hits_2, misses_2) = (map(int, r.stdout.split()) for r in runs)
  assert misses_1 >= 1 and hits_2 >= 1 and misses_2 == 0, (hits_1, misses_1, hits_2, misses_2)
