"""The package version, read by ``pyproject.toml`` (setuptools dynamic) and `adderjax`."""

__version__ = "0.1.0"
