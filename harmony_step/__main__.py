"""``python -m harmony_step``: the same as the ``harmony-step`` command."""

from harmony_step.cli import main

raise SystemExit(main())
