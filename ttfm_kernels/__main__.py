"""``python -m ttfm_kernels``: the ``ttfm`` command line."""

import sys

from ttfm_kernels.cli import main

sys.exit(main())
