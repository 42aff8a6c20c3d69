"""`python -m imageloop`: the same command line as the `imageloop` script."""

import sys

from imageloop.cli import main

sys.exit(main())
