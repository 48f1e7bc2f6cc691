"""The command lines' shared manners: a bad flag or input is one line on stderr naming it, exit status 2,
and an output path the user did not name as replaceable is never written over.

argparse's own error() prints the whole usage block first, which buries the one line that matters when a
job's log is read on a dashboard; `--help` still prints it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import NoReturn

from common.cluster import lost_in_job_copy


class InputError(ValueError):
    """Unusable input; the message names the file or flag."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def output_problem(flag: str, path: str | os.PathLike, overwrite: bool, directory: bool = False,
                   reads: tuple[str | os.PathLike, ...] = ()) -> str | None:
    """Why `path` (a file, or a `directory` to write into) may not take a command's output, or None: the user did
    not name an existing one as replaceable (--overwrite), it is inside what the command reads (a checkpoint being
    exported or plotted), it would be lost in a Ray job's copy of its working dir, or it cannot be made there.
    Checked before anything is written."""
    if why := lost_in_job_copy(path):
        return f"{flag} {path}: {why}"
    target = Path(path).resolve()
    for source in map(Path, reads):
        source = source.resolve()
        if target == source or source in target.parents or (directory and target in source.parents):
            where = "is" if target == source else "inside"
            return f"{flag} {path}: {where} {source}, which this command reads; write somewhere else"
    if target.exists():
        if directory != target.is_dir():
            return f"{flag} {path}: " + ("exists and is not a directory" if directory else
                                         "is a directory; give a file name")
        if not overwrite and (not directory or any(target.iterdir())):
            return f"{flag} {path}: already exists; pass --overwrite to replace it"
    elif not target.parent.is_dir():
        return f"{flag} {path}: directory {target.parent} does not exist"
    return None
