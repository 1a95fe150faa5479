"""``python -m fidelity``: the command line, as the ``fidelity`` script runs it."""

from fidelity.cli import main

raise SystemExit(main())
