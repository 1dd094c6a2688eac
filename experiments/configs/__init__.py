"""One ``get_config()`` per row of the paper's tables, its ablations and a smoke test.

Pass a file to the trainer with ``--config=experiments/configs/FILE.py`` and
choose the network with the text after a colon, ``...py:conv``; the default is
the AdderNet. :mod:`experiments.configs.common` holds the fields and their
meaning.
"""
