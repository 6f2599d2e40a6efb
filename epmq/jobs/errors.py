"""Bad input ends a command-line run with one line that names the option or file, not a traceback.

epmq checks options, files and data before any long work and raises ValueError (or a missing-file
error) whose message names what is wrong and what is allowed. At the command line that message is
all a user needs: `user_errors()` logs it as one line (the console and the run's log file) and
exits with status 1. HYDRA_FULL_ERROR=1 (Hydra's own switch) shows the full traceback instead.
Anything else, a bug, keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

log = logging.getLogger("epmq")  # the one line a user reads names the product, not a module

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


@contextmanager
def user_errors():
    """Turn a bad-input error raised inside into one logged line and exit status 1."""
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s (HYDRA_FULL_ERROR=1 shows the traceback)", " ".join(str(e).split()))
        sys.exit(1)
