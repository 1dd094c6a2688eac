"""Where adderjax keeps files for the user: one cache directory, shared by downloads and builds."""

from __future__ import annotations

import os
import pathlib

__all__ = ["user_cache_dir"]


def user_cache_dir(override_variable: str) -> pathlib.Path:
  """``$override_variable`` if set, else ``$XDG_CACHE_HOME/adderjax``, else ``~/.cache/adderjax``.

  Args:
    override_variable: The environment variable that, when set, names the directory instead.
  """
  if os.environ.get(override_variable):
    return pathlib.Path(os.environ[override_variable]).expanduser()
  cache = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(cache).expanduser() / "adderjax"
