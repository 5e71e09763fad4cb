"""`python -m kubetune` is the `kubetune` command."""

from kubetune.cli import main

raise SystemExit(main())
