"""A user's own dataset and models, tried from the user's side (docs/own_data.md): category ids 3, 7 and 12, an
image without boxes, a box without area, a missing image file; the programs run from another working directory.
No silent wrong answer: a run owns its label map, every check comes before the workdir is claimed, an
architecture mismatch is one line, every annotation defect is named or counted."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, official
from PIL import Image, ImageDraw

from sparse_detr_jax import checkpoints, trainer
from sparse_detr_jax import config as config_lib
from sparse_detr_jax import model as model_lib
from sparse_detr_jax import workdir as workdir_lib
from sparse_detr_jax.data import categories, sources

CATEGORIES = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}, {"id": 12, "name": "triangle"}]
NAMES = {c["id"]: c["name"] for c in CATEGORIES}
PY = [sys.executable]


def make_dataset(root: pathlib.Path) -> pathlib.Path:
  """train (10 images, one of them missing) and val (4) splits of 64x48 pictures, ids 3, 7, 12."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 10), ("val", 4)):
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(n):
      img = Image.fromarray(rng.integers(90, 200, (48, 64, 3)).astype(np.uint8))
      draw = ImageDraw.Draw(img)
      images.append({"id": i + 1, "file_name": f"{split}{i}.jpg", "width": 64, "height": 48})
      for _ in range(0 if i == 1 else 2):  # image 2: no boxes
        k, s = int(rng.integers(3)), int(rng.integers(10, 20))
        x, y = int(rng.integers(0, 64 - s)), int(rng.integers(0, 48 - s))
        (draw.ellipse if k == 0 else draw.rectangle)([x, y, x + s, y + s], fill=(220, 40, 40))
        anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": CATEGORIES[k]["id"],
                     "bbox": [x, y, s, s], "iscrowd": 0})  # fmt: skip
      if not (split == "train" and i == 2):  # one missing file
        img.save(root / split / f"{split}{i}.jpg")
    anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10], "iscrowd": 0})
    data = {"images": images, "annotations": anns, "categories": CATEGORIES}
    (root / "annotations" / f"{split}.json").write_text(json.dumps(data))
  return root


def data_flags(root: pathlib.Path | str) -> list[str]:
  return [
    f"--config={ROOT / 'configs' / 'shapes_tiny.py'}",
    f"--config.data.coco_dir={root}",
    "--config.data.train_images=train",
    "--config.data.val_images=val",
    "--config.data.train_annotations=annotations/train.json",
    "--config.data.val_annotations=annotations/val.json",
    "--noretain_host_memory",
  ]


def run(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert all(w in last for w in words), last
  return last


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp("mydata"))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
  """A 2-step run on the dataset (num_classes 13), started from a directory that is not the repository, the dataset
  given relative to it."""
  elsewhere = tmp_path_factory.mktemp("elsewhere")
  workdir = elsewhere / "runs" / "my3"
  args = [*PY, str(ROOT / "train.py"), f"--workdir={workdir}", *data_flags(os.path.relpath(dataset, elsewhere))]
  r = run([*args, "--config.model.num_classes=13", "--config.train.max_steps=2"], elsewhere)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir, elsewhere, r.stderr


def test_a_run_that_fails_its_checks_claims_nothing(dataset, tmp_path):
  """Wrong classes, unusable canvases, a checkpoint of another architecture: one line, and the workdir is not
  claimed, so the corrected command is not refused."""
  workdir = tmp_path / "w"
  args = [*PY, str(ROOT / "train.py"), f"--workdir={workdir}", *data_flags(dataset)]
  r = run([*args, "--config.model.num_classes=4"], tmp_path)
  one_line_error(r, "train.json: category id 12 >= model.num_classes = 4", "--config.model.num_classes=13")
  r = run([*args, "--config.model.num_classes=13", "--config.data.buckets=((40, 40),)"], tmp_path)
  one_line_error(r, "buckets")
  r = run([*args, "--config.model.num_classes=13", f"--config.train.init_checkpoint={official('tiny_sparse.pth')}"],
          tmp_path)  # fmt: skip
  one_line_error(r, "init_checkpoint", "model.num_feature_levels = 4 in the checkpoint, 2 in the config",
                 "--config.model.num_feature_levels=4")  # fmt: skip
  assert not workdir.exists()


def test_a_run_owns_its_label_map(trained, dataset):
  """labels.json is the dataset's categories; predict, run from elsewhere, names and reports only them, with the
  config file given from another directory for its transform; the missing file and the box without area are
  counted in the metrics."""
  workdir, elsewhere, log = trained
  assert categories.read(workdir) == NAMES
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {(m["skipped_images"], m["skipped_annotations"]) for m in logged if "total_loss" in m} == {(1, 1)}
  assert "1 skipped: image file missing" in log and "box without area" in log
  other = elsewhere / "somewhere_else"
  other.mkdir()
  config = f"--config={ROOT / 'configs' / 'shapes_tiny.py'}"  # its transform; the model and names: the run's
  r = run([*PY, "-m", "sparse_detr_jax.predict", f"--workdir={workdir}", "--threshold=0", "--out=p", config,
           str(dataset / "val" / "val0.jpg"), str(dataset / "val")], other)  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  saved = json.loads((other / "p" / "detections.json").read_text())
  found = {(d["category_id"], d["category"]) for entry in saved for d in entry["detections"]}
  assert found == set(NAMES.items()), found  # 10 queries x 3 categories each, every category
  assert [e["picture"] for e in saved[:2]] == [str(pathlib.Path("p") / n) for n in ("val0.png", "val0_1.png")]
  assert r.stdout.strip() == "wrote p/detections.json (5 images) and 5 pictures"


def test_evaluate_names_its_checkpoint_prints_once_and_says_where_it_wrote(trained, tmp_path):
  """From yet another directory (the run's data paths are recorded absolute); annotations without 'area'."""
  workdir, _, _ = trained
  r = run([*PY, str(ROOT / "evaluate.py"), f"--workdir={workdir}", "--noretain_host_memory"], tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (r.stdout + r.stderr).count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 1
  step = workdir / "checkpoints" / "2"
  assert f"evaluating {step} (step 2)" in r.stderr
  assert r.stdout.strip().splitlines()[-1] == f"evaluated {step} (step 2); wrote eval_metrics.json and " \
    f"eval_results.json to {workdir}"  # fmt: skip
  metrics = json.loads((workdir / "eval_metrics.json").read_text())
  assert set(k.split("/")[1] for k in metrics if k.startswith("AP_per_class/")) == set(NAMES.values())


def test_a_resumed_run_on_other_categories_is_refused_and_a_workdir_without_checkpoint_takes_a_new_config(
  trained, tmp_path, caplog
):
  workdir, _, _ = trained
  with pytest.raises(workdir_lib.ConfigMismatch, match=r"id 12: 'triangle' in the workdir, 'star' now"):
    workdir_lib.check_labels({**NAMES, 12: "star"}, str(workdir), "other.json")
  cfg = config_lib.load_config_file(str(ROOT / "configs" / "shapes_tiny.py"))
  workdir_lib.record(cfg, str(tmp_path), NAMES)  # a run that stopped before its first checkpoint
  cfg.model.num_classes = 13
  with caplog.at_level(logging.WARNING):
    workdir_lib.check(cfg, str(tmp_path))
  assert "the config of a run that wrote no checkpoint; this run's config replaces it" in caplog.text


def test_fine_tuning_says_what_it_loaded_and_initialised(caplog):
  """From an official checkpoint with 91 classes to 13: every weight but the class heads' is the checkpoint's."""
  path = official("tiny_sparse.pth")
  ckpt = checkpoints.find(str(path))
  cfg = config_lib.load_config_file(str(ROOT / "configs" / "shapes_tiny.py"))
  cfg.model = config_lib.from_json(ckpt.model_config.to_dict())
  cfg.model.num_classes = 13
  cfg.train.init_checkpoint = str(path)
  model = model_lib.build_model(cfg.model)
  with caplog.at_level(logging.INFO):
    variables = trainer.initial_variables(cfg, model, jax.random.PRNGKey(0))
  heads = 2 * model_lib.num_prediction_heads(cfg.model)  # kernel and bias of each class head
  assert f"initialised {heads} (the class heads, for model.num_classes = 13; the checkpoint has 91)" in caplog.text
  _, loaded = checkpoints.load(ckpt)
  assert np.array_equal(variables["params"]["level_embed"], loaded["params"]["level_embed"])
  assert variables["params"]["class_embed_0"]["kernel"].shape == (256, 13)


def write(root: pathlib.Path, data: dict) -> pathlib.Path:
  (root / "img").mkdir(exist_ok=True)
  Image.new("RGB", (64, 48)).save(root / "img" / "a.jpg")
  path = root / "ann.json"
  path.write_text(json.dumps(data))
  return path


GOOD_IMAGE = {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}
GOOD_ANN = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 10, 10]}


@pytest.mark.parametrize(
  "change, message",
  [
    ({"categories": [{"id": 3}]}, r"categories\[0\] lacks 'name'"),
    ({"categories": [{"id": "3", "name": "x"}]}, r"categories\[0\] 'id' must be a non-negative integer"),
    ({"categories": [{"id": 3, "name": "a"}, {"id": 3, "name": "b"}]}, r"categories\[1\] repeats id 3"),
    ({"images": [GOOD_IMAGE, GOOD_IMAGE]}, r"images\[0\] and images\[1\] have the same id 1"),
    ({"images": [{**GOOD_IMAGE, "width": 0}]}, r"images\[0\] \(id 1\) 'width' must be a positive integer"),
    ({"annotations": [{**GOOD_ANN, "category_id": 5}]}, r"annotations\[0\] \(id 1\) has category_id 5, which is not"),
  ],
)
def test_an_annotation_file_that_cannot_mean_anything_is_named(tmp_path, change, message):
  data = {"images": [GOOD_IMAGE], "annotations": [GOOD_ANN], "categories": [{"id": 3, "name": "circle"}]} | change
  path = write(tmp_path, data)
  with pytest.raises(ValueError, match=f"annotation file {path}: {message}"):
    sources.CocoSource(tmp_path / "img", path)


def test_what_one_entry_spoils_is_skipped_and_counted(tmp_path, caplog):
  anns = [
    GOOD_ANN,
    {**GOOD_ANN, "id": 2, "image_id": 99},  # no such image
    {**GOOD_ANN, "id": 3, "bbox": [1, 1, 10]},  # not 4 numbers
    {**GOOD_ANN, "id": 4, "bbox": [70, 1, 10, 10]},  # outside its image
    {"id": 5, "image_id": 1, "bbox": [1, 1, 2, 2]},  # no category_id
    {**GOOD_ANN, "id": 6, "iscrowd": 1},
  ]
  images = [GOOD_IMAGE, {"id": 2, "file_name": "gone.jpg", "width": 64, "height": 48}]
  path = write(tmp_path, {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "circle"}]})
  with caplog.at_level(logging.WARNING):
    src = sources.CocoSource(tmp_path / "img", path)
  assert (len(src), src.skipped_images, src.skipped_annotations, src.crowd_boxes) == (1, 1, 4, 1)
  assert "annotations[1] (id 2): image_id 99" in caplog.text and "gone.jpg" in caplog.text
  assert len(src.annotations(0).labels) == 1  # the good box; the crowd box is left out of training
