"""``python -m ranker``: the command line (what ``torchrun -m ranker train ...`` runs)."""

import sys

from ranker.cli import main

sys.exit(main())
