"""``python -m ranker``: the command line (what ``torchrun -m ranker train ...`` runs)."""

import os
import sys

from ranker.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun worker has destroyed its process group by now. Skipping interpreter
    # finalisation avoids a rare SIGABRT ("terminate called without an active exception") seen
    # here under load when gloo's C++ threads are torn down during it; everything the run
    # writes is already flushed and closed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
