"""The documentation's commands run as written: every shell command in README.md, docs/ and benchmarks/README.md
names a make target that exists, a program that takes its flags (the config files and `--config.x.y` overrides
load) or, run here in a scratch folder, succeeds; every Python example compiles and names what exists."""

import ast
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, official

DOCUMENTS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Programs run on the command line by cli.run: checked with cli.CHECK_FLAGS (flags parsed, config loaded).
CLI_PROGRAMS = ("train.py", "evaluate.py", *(f"sparse_detr_jax.{m}" for m in ("predict", "export", "preflight")))
# Cheap enough to run for real, in a scratch folder where the documented checkpoint names are fixture checkpoints.
RUN = ("sparse_detr_jax.convert", "sparse_detr_jax.data.shapes", "sparse_detr_jax.export")
CHECKPOINTS = {"sparse_detr_r50_10.pth": "r50_sparse.pth"}


def blocks(language: str) -> list[tuple[str, str]]:
  """(document name, code) of every fenced block in `language` ('sh' also takes 'bash')."""
  found = []
  for path in DOCUMENTS:
    for lang, code in re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), re.S | re.M):
      if lang == language or (language == "sh" and lang == "bash"):
        found.append((path.relative_to(ROOT).as_posix(), code))
  return found


def commands() -> list[tuple[str, list[str]]]:
  """(document, argv) of every shell command: continuation lines joined, comments dropped, `&&` chains split."""
  out = []
  for doc, code in blocks("sh"):
    for line in code.replace("\\\n", " ").splitlines():
      line = line.split(" #")[0].strip()
      if line and not line.startswith("#"):
        out += [(doc, shlex.split(part)) for part in line.split("&&")]
  return out


def program(argv: list[str]) -> tuple[str, list[str]]:
  """('make' | 'pip' | '-c' | a module name | a script path, its arguments)."""
  if argv[0] in ("make", ".venv/bin/pip"):
    return argv[0].rpartition("/")[2], argv[1:]
  assert argv[0] in (".venv/bin/python", "python", "bash"), f"unexpected command {argv}"
  if argv[1] == "-m":
    return argv[2], argv[3:]
  return argv[1], argv[2:]


def test_pip_commands_pin_the_locked_versions():
  lock = dict(re.findall(r"^([\w.-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M))
  pins = [(doc, a) for doc, argv in ALL if program(argv)[0] == "pip" for a in argv if "==" in a]
  assert pins
  for doc, pin in pins:
    name, version = re.sub(r"\[.*\]", "", pin).split("==")
    assert lock.get(name, version) == version, f"{doc}: {pin}, but constraints.txt has {name}=={lock[name]}"


ALL = commands()


def test_the_documents_have_commands():
  names = {program(argv)[0] for _, argv in ALL}
  assert {"make", "train.py", "evaluate.py", "sparse_detr_jax.predict", "sparse_detr_jax.export"} <= names, names


@pytest.mark.parametrize("doc, argv", [c for c in ALL if program(c[1])[0] == "make"], ids=lambda v: " ".join(v))
def test_make_targets_exist(doc, argv):
  run = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert run.returncode == 0, f"{doc}: {' '.join(argv)}: {run.stderr}"


def test_documented_command_lines_parse():
  """Each command-line program, given the documented flags, parses them and loads its config (once per distinct
  command); scripts and argparse programs name every flag they are given."""
  env = {**os.environ, "SPARSE_DETR_CHECK_FLAGS": "1", "JAX_PLATFORMS": "cpu"}
  checked = set()
  for doc, argv in ALL:
    name, args = program(argv)
    if name in ("make", "pip") or tuple(argv) in checked:
      continue
    checked.add(tuple(argv))
    if name == "-c":
      compile(args[0], doc, "exec")
      continue
    if name in CLI_PROGRAMS:
      cmd = [sys.executable, *((name,) if name.endswith(".py") else ("-m", name)), *args]
      run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
      assert run.returncode == 0, f"{doc}: {' '.join(argv)}: {run.stderr[-2000:]}"
      continue
    source = ROOT / (name if "/" in name or name.endswith(".py") else name.replace(".", "/") + ".py")
    assert source.is_file(), f"{doc}: {' '.join(argv)}: no {source}"
    text = source.read_text()
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
      assert f'"{flag}"' in text or f'"{flag[2:]}"' in text, f"{doc}: {' '.join(argv)}: {source.name} has no {flag}"


def test_cheap_commands_run_as_written(tmp_path):
  """The dataset generator, the converter and the exports, with the documented arguments; the checkpoint the
  documents name is a fixture checkpoint of the same architecture (ResNet-50, a smaller transformer)."""
  for name, fixture in CHECKPOINTS.items():
    (tmp_path / name).symlink_to(official(fixture))
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  ran = set()
  for doc, argv in ALL:
    name, args = program(argv)
    if name in RUN and tuple(argv) not in ran:
      ran.add(tuple(argv))
      run = subprocess.run([sys.executable, "-m", name, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
      assert run.returncode == 0, f"{doc}: {' '.join(argv)}: {run.stderr[-2000:]}"
  assert {p.split()[2] for p in (" ".join(a) for a in ran)} == set(RUN)
  assert (tmp_path / "converted" / "config.json").is_file() and (tmp_path / "data" / "shapes" / "val").is_dir()


@pytest.mark.parametrize("doc, code", blocks("python"), ids=lambda v: v if v.endswith(".md") else "")
def test_python_examples_compile_and_name_what_exists(doc, code):
  tree = ast.parse(code, doc)
  modules = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparse_detr_jax"):
      for alias in node.names:
        module = importlib.import_module(node.module)
        assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
          f"{doc}: {node.module} has no {alias.name}"
        )
        modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
      target = modules[node.value.id]
      obj = importlib.import_module(target) if importlib.util.find_spec(target) else None
      if obj is None:
        module, _, attr = target.rpartition(".")
        obj = getattr(importlib.import_module(module), attr)
      assert hasattr(obj, node.attr), f"{doc}: {target} has no {node.attr}"
