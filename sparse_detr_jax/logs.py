"""Console logging of the command-line entry points: our progress lines, not the libraries' chatter."""

import logging
import os

from absl import flags
from absl import logging as absl_logging


def quiet_library_logs() -> None:
  """Show JAX's lines (backend probing: "Unable to initialize backend 'tpu'") and Orbax's per-save lines
  only from WARNING up, unless --verbosity asks for debug output (1 or more). Our INFO lines stay."""
  if flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1:
    return
  logging.getLogger("jax").setLevel(logging.WARNING)
  absl_logging.get_absl_handler().addFilter(
    lambda r: r.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in r.pathname
  )
