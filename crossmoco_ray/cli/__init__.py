"""The ``crossmoco`` command line: one module per command group, assembled by :mod:`.main`."""
