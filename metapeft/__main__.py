"""``python -m metapeft ...``: the ``metapeft`` command line (:mod:`metapeft.cli`)."""

import sys

from metapeft.cli import main

sys.exit(main())
