"""A cloud -o (s3://, gs://): rank 0 writes into a local staging directory (gpt2/rundir.py's make_staging) and the
run's logs go up with every checkpoint, which Ray Train uploads itself. fsspec, as every other file of the project."""

from __future__ import annotations

import os

from gpt2.rundir import RUN_LOGS


def staged(run_dir: str) -> bool:
    """Whether -o is written through a staging directory: any URL, file:// included (the local stand-in for a
    bucket that the tests use), where other commands read file:// as a local path (common/files.py)."""
    return "://" in run_dir


def upload(staging: str, run_dir: str, *names: str) -> None:
    """Copy files of the local staging directory (those that exist) next to the checkpoints of a cloud -o."""
    import fsspec

    filesystem, root = fsspec.core.url_to_fs(run_dir)
    for name in names:
        if os.path.exists(local := os.path.join(staging, name)):
            filesystem.put_file(local, f"{root}/{name}")


def fetch_run_logs(run_dir: str, staging: str) -> None:
    """Rank 0 of a resumed cloud run, whose staging directory is new: bring back the logs as uploaded with the
    latest checkpoint, so that they are continued, not started over."""
    import fsspec

    filesystem, root = fsspec.core.url_to_fs(run_dir)
    for name in RUN_LOGS:
        if filesystem.isfile(f"{root}/{name}"):
            filesystem.get_file(f"{root}/{name}", os.path.join(staging, name))
