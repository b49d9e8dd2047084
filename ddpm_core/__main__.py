"""`python -m ddpm_core` runs the command line.

OpenMP's threads wait for work by sleeping rather than spinning (OMP_WAIT_POLICY=PASSIVE,
unless you set it yourself): beside another busy program on a 2-core machine, spinning threads
fight it for the cores (benchmarks/bench_threads.py, README "Sharing the CPU"). It must be set
before torch is imported, and the notebook kernels of `make run` inherit it.
"""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ddpm_core.cli import main  # noqa: E402  (after the environment is set)

sys.exit(main())
