"""``python -m batch_export`` is the same as the ``batch-export`` command."""

from batch_export.cli import main

main()
