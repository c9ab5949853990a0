"""Before a trainer writes into a run dir: every file and folder it will write is what it must
be. A run dir can come from someone else (a tarball, a shared disk); a symbolic link planted
in it (steps.msgpack -> ~/.bashrc) must never make `resume` write outside the run dir.

torch-free, so the CLI checks before it detaches, and the trainer again under its lock."""

from __future__ import annotations

import os
import stat

from protocol.rundir import RunDirError, RunPaths


def check_writer_files(paths: RunPaths) -> None:
    """Raise RunDirError (one line naming the file) if a file the trainer writes is a link,
    a FIFO, a device or a folder, or a folder it writes into is a link or a file."""
    files = [
        paths.steps,
        paths.steps_jsonl,
        paths.events,
        paths.samples,
        paths.alert_rules,
        paths.manifest,
        paths.log,
        paths.pid_file,
        paths.heartbeat,
    ]
    folders = [paths.tb, paths.checkpoints, paths.profile]
    for p in files + folders:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise RunDirError(f"cannot inspect {p}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise RunDirError(f"{p} is a symbolic link; refusing to write through it")
        if p in files and not stat.S_ISREG(st.st_mode):
            raise RunDirError(f"{p} is not a regular file; refusing to write to it")
        if p in folders and not stat.S_ISDIR(st.st_mode):
            raise RunDirError(f"{p} is not a folder; refusing to write into it")
    for folder in folders:  # what the trainer appends to or replaces inside its folders
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise RunDirError(f"cannot list {folder}: {e.strerror}") from None
        for entry in entries:
            if entry.is_symlink():
                raise RunDirError(f"{entry.path} is a symbolic link; refusing to write next to it")
