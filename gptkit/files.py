"""
Files that are never half-written: the one way gptkit writes anything a crash, a kill or a full
disk must not destroy (checkpoints, shards, data folders, exports, logs).

    atomic_write(path, lambda f: f.write(data))        # temporary file, fsync, rename over path
    atomic_write_files(folder, {name: write_fn}, marker="meta.json")   # a set of files, replaced as one
    remove_temporaries(folder, r"ckpt\\.pt|ckpt\\.json")   # what a killed atomic_write left behind
"""

import errno
import os
import re


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write_fn):
    """Call write_fn(file) on a temporary file next to path, fsync it, then rename it over path.
    If anything fails (a full disk, a kill) the old file at path is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch.save's zip writer turns a full disk into RuntimeError("unexpected pos ..."), the OSError only
        # in its context: raise the OSError, naming the file, so the user reads "the disk is full"
        full = e.__context__ if isinstance(e, RuntimeError) else e
        if isinstance(full, OSError) and full.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(full.errno, full.strerror, path) from e
        raise
    _fsync_dir(directory)


def remove_temporaries(directory, names):
    """Delete the temporary files atomic_write leaves in directory when a kill cuts it short
    (<name>.tmp<pid>), for the names matching the regex `names`: never another program's files."""
    pattern = re.compile(rf"({names})\.tmp\d+")
    for name in os.listdir(directory):
        if pattern.fullmatch(name):
            os.remove(os.path.join(directory, name))


def atomic_write_files(directory, files, marker):
    """Write files that only make sense together (name -> write_fn(file)), marker among them: the file
    whose presence tells readers the folder is complete (meta.json, config.json). A kill or a full disk
    at any moment leaves the old set whole, or the folder without its marker (refused, with a message),
    never old and new files mixed. Every file is first written in full under NAME.new, the long part,
    while the old set stays usable; then the marker goes, the others are renamed into place, and the
    marker comes back last."""
    os.makedirs(directory, exist_ok=True)
    for name, write_fn in files.items():
        atomic_write(os.path.join(directory, f"{name}.new"), write_fn)
    marker_path = os.path.join(directory, marker)
    if os.path.exists(marker_path):
        os.remove(marker_path)
        _fsync_dir(directory)  # the marker is gone on disk before any file of the old set is replaced
    for name in files:
        if name != marker:
            os.replace(os.path.join(directory, f"{name}.new"), os.path.join(directory, name))
    _fsync_dir(directory)  # ... and every new file is in place before the marker returns
    os.replace(f"{marker_path}.new", marker_path)
    _fsync_dir(directory)
