"""``python -m mfo_actors`` runs the same CLI as the ``mfo-actors`` console script."""

from mfo_actors.cli import main

raise SystemExit(main())
