"""`python -m wan_core.generate`."""

from wan_core.generate.cli import main

raise SystemExit(main())
