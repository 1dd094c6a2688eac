"""``python -m adderjax.profiling``: see :mod:`adderjax.profiling.cli`."""

from adderjax.profiling.cli import main

raise SystemExit(main())
