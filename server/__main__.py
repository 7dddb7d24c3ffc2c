"""`python -m server [flags]` is `sleepserve serve [flags]`."""

import sys

from server.cli import serve

sys.exit(serve(sys.argv[1:]))
