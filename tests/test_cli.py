"""The command-line programs' usage conventions (sparse_detr_jax/cli.py): --help exits 0; a flag or config the
program cannot take is one line naming it and exit status 2."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT


def _run(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


PROGRAMS = [
  "train.py",
  "evaluate.py",
  "sparse_detr_jax.predict",
  "sparse_detr_jax.export",
  "sparse_detr_jax.preflight",
  "sparse_detr_jax.convert",
]


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_exits_0_and_its_usage_reads_as_one_command(program):
  run = _run(program, "--help") if program.endswith(".py") else _run("-m", program, "--help")
  assert run.returncode == 0 and "flags:" in run.stdout, run.stderr[-2000:]
  commands = [line for line in run.stdout.split("flags:")[0].splitlines() if "--" in line]
  assert commands and not any(re.search(r"\S {3,}\S", line) for line in commands), commands  # no runs of spaces


@pytest.mark.parametrize(
  "args, message",
  [
    (["--workdir=/nonexistent/w", "--config.model.nope=3"], "train.py: --config.model.nope: the config has no field"),
    (
      ["--workdir=/nonexistent/w", "--config.train.max_step=3"],
      "train.py: --config.train.max_step: the config has no field 'max_step' (did you mean 'max_steps'?)",
    ),
    (["--workdir=/nonexistent/w", "--config.model.rho=abc"], "could not convert string to float: 'abc'"),
    ([], "--workdir"),
    (["--workdir=/nonexistent/w", "--config.model.rho=1.5"], "train.py: model.rho: expected 0 <= rho < 1, got 1.5"),
    (["--workdir=/nonexistent/w", "--config.data.coco_dir=/nonexistent/d"], "train.py: annotation file /nonexistent/"),
  ],
)
def test_a_bad_flag_or_input_is_one_line_and_exit_2(args, message):
  run = _run("train.py", "--config=configs/shapes_tiny.py", *args)
  assert run.returncode == 2 and message in run.stderr.strip().splitlines()[-1], run.stderr[-2000:]
  assert "Traceback" not in run.stderr and not any(line.startswith("  ") for line in run.stderr.splitlines())


def test_a_missing_config_file_is_one_line_and_exit_2():
  run = _run("evaluate.py", "--config=configs/nope.py", "--workdir=/nonexistent/w")
  assert run.returncode == 2 and "No such file or directory: 'configs/nope.py'" in run.stderr, run.stderr[-2000:]


def test_export_names_a_platform_it_cannot_target():
  run = _run("-m", "sparse_detr_jax.export", "--checkpoint=x.pth", "--out=/nonexistent/e", "--platforms=cpu,gpu")
  assert run.returncode == 2 and "export.py: --platforms 'gpu': expected some of cpu, cuda" in run.stderr, run.stderr
