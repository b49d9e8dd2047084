"""`python -m ddpm_core` runs the command line."""

import sys

from ddpm_core.cli import main

sys.exit(main())
