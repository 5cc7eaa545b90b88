"""``python -m accounting``: the ``lipdp budget`` command."""

from accounting.cli import main

raise SystemExit(main())
