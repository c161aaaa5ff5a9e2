"""Running a command-line program: `--help` prints the usage and exits 0; a flag the program cannot take (a
missing or unknown flag, a config file or `--config.x.y` override that does not load) is one line naming it on
standard error and exit status 2, instead of absl's exit 1 or a traceback. So is an input the program finds wrong
once it runs (INPUT_ERRORS: a config value out of range, a missing or malformed file; the messages name the field
or the file); `--verbosity=1` shows the traceback instead."""

import os
import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

from sparse_detr_jax import config as config_lib

HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")
# Set to 1: stop after parsing the flags and loading the config (how the tests check the documented commands).
CHECK_FLAGS = "SPARSE_DETR_CHECK_FLAGS"
# What the project raises for wrong input (pth.CheckpointError and workdir.ConfigMismatch are ValueErrors).
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
  """app.run(main) with the usage conventions above."""
  argv = list(sys.argv if argv is None else argv)
  prog = os.path.basename(argv[0])
  asked = [a for a in argv[1:] if a in HELP]
  if asked:
    app.usage(shorthelp="--helpfull" not in asked, writeto_stdout=True)
    sys.exit(0)
  for k, a in enumerate(argv[1:], 1):  # config files load from any working directory
    if a.startswith("--config="):
      config_lib.make_importable(a.split("=", 1)[1])
    elif a == "--config" and k + 1 < len(argv):
      config_lib.make_importable(argv[k + 1])
  try:
    remaining = flags.FLAGS(argv)
    for name in flags.FLAGS:  # config files load when first read: read them now
      hasattr(flags.FLAGS[name].value, "to_dict")
  except Exception as e:  # any failure to parse is the user's to fix, in one line
    sys.stderr.write(f"{prog}: {_message(e, argv)} (--help lists the flags)\n")
    sys.exit(2)
  if os.environ.get(CHECK_FLAGS) == "1":
    print(f"{prog}: the flags parse and the config loads")
    sys.exit(0)
  app.run(_input_errors_in_one_line(main, prog), argv=argv, flags_parser=lambda _: remaining)


def _input_errors_in_one_line(main: Callable[[list[str]], None], prog: str) -> Callable[[list[str]], None]:
  def run_main(argv: list[str]) -> None:
    try:
      main(argv)
    except INPUT_ERRORS as e:
      if flags.FLAGS["verbosity"].value >= 1:
        raise
      sys.stderr.write(f"{prog}: {str(e).strip() or type(e).__name__}\n")
      sys.exit(2)

  return run_main


def _message(error: Exception, argv: Sequence[str]) -> str:
  text = str(error).strip()
  if isinstance(error, (AttributeError, KeyError)):  # a --config.x.y override naming no field
    # ml_collections raises AttributeError(KeyError("'name'\nDid you mean \"other\" instead of \"name\"?")).
    inner = error.args[0] if error.args and isinstance(error.args[0], BaseException | str) else text
    while isinstance(inner, BaseException):
      inner = inner.args[0] if inner.args else ""
    lines = str(inner).strip().strip("\"'").splitlines() or [""]
    name = lines[0].strip().strip("\"'")
    hint = re.search(r'Did you mean "([^"]+)"', str(inner))
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a.split("=")[0].split(".")]
    if bad:
      return f"{bad[0]}: the config has no field {name!r}" + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
  return text.splitlines()[-1].strip() if text else type(error).__name__


def usage_error(message: str) -> None:
  """A usage mistake found after parsing: one line naming the program, exit status 2."""
  sys.stderr.write(f"{os.path.basename(sys.argv[0])}: {message}\n")
  sys.exit(2)
