"""``python -m unfreeze_hpo.cli``: the ``unfreeze-hpo`` command (what a submitted job runs)."""

import sys

from unfreeze_hpo.cli import main

sys.exit(main())
