"""The ``weir`` command, one module per verb group."""
