"""``python -m softrepa``: the same command line as the ``softrepa`` script."""

from softrepa.cli import main

main()
