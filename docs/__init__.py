"""Documentation helpers: ``python -m docs.make_figures`` makes the README's figures."""
