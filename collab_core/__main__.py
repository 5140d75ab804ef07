"""``python -m collab_core``: the ``collab`` command."""

import sys

from collab_core.cli import main

sys.exit(main())
