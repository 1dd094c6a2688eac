"""The trainer's console: clean message lines for its own and adderjax's loggers.

absl's handler heads every line with the level, time, thread and source line
(``I1203 09:04:55.426517 ... train.py:418]``); the trainer's lines should read
like the main job's (:mod:`experiments.compare_mnist`). Warnings and errors
keep going to the console, as lines of their own.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

__all__ = ["LOGGERS", "configure"]

LOGGERS = ("experiments", "adderjax")
"""The loggers shown as bare messages at ``INFO`` and above."""


def configure(stream: TextIO | None = None) -> logging.Handler:
  """Shows :data:`LOGGERS`' records as ``%(message)s`` lines on ``stream`` (stderr).

  They no longer propagate to the root logger, so absl's handler there does not
  print them a second time with its prefix. Calling it again replaces the
  handler it installed before.

  Returns:
    The handler installed.
  """
  handler = logging.StreamHandler(stream or sys.stderr)
  handler.setFormatter(logging.Formatter("%(message)s"))
  handler.set_name("experiments.console")
  for name in LOGGERS:
    logger = logging.getLogger(name)
    for old in [h for h in logger.handlers if h.get_name() == "experiments.console"]:
      logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
  return handler
