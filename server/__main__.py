"""`python -m server [flags]` is `sleepserve serve [flags]`."""

import sys

from server.cli import serve

if __name__ == "__main__":  # the sleeper's child process (spawn) imports this module again
    sys.exit(serve(sys.argv[1:]))
