"""``python -m flowkit`` is the ``flowkit`` command."""

from flowkit.cli import main

main()
