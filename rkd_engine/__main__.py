"""``python -m rkd_engine`` runs the ``rkd`` command line."""

import sys

from rkd_engine.cli import main

sys.exit(main())
