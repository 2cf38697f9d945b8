"""`python -m kubectl_beacon`: the same as the `kubectl-beacon` command, for a checkout without the entry point."""

import sys

from kubectl_beacon.cli import main

sys.exit(main())
