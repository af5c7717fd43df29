"""`python -m minimind ...` is the same as the `minimind` command (and what torchrun runs)."""

from minimind.cli import main

raise SystemExit(main())
