"""The command lines' shared manners: a bad flag or input is one line on stderr naming it, exit status 2.

argparse's own error() prints the whole usage block first, which buries the one line that matters when a
job's log is read on a dashboard; `--help` still prints it.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class InputError(ValueError):
    """Unusable input; the message names the file or flag."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")
