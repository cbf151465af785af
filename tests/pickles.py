"""A pickle that runs a command when loaded: token-file loaders must refuse it."""

from __future__ import annotations

import os


class EvilPickle:
    """Unpickles to ``os.system("echo pwned")``: any loader that accepts it runs code."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))
