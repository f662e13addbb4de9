"""
One writer per folder: a run's out_dir, a prepared data folder, an export folder.

    hold_folder("out/fineweb_124m")   # FolderBusyError (one `error:` line) naming another process that has it

Two processes writing one folder at once corrupt it without a word (a log with fused lines, a
checkpoint that is whichever saved last, shards of two preparations mixed). So each script that
writes a folder first takes <folder>/.gptkit.lock: an OS lock on that file (fcntl.flock, msvcrt on
Windows) plus a line of JSON naming the holder (pid, host, start time, command) for the message a
second process prints. The OS drops the lock when its process dies, however it dies (kill -9
included), so a killed run's lock file is simply taken over by the next one. The lock is released,
and its file removed, when the process exits.
"""

import atexit
import contextlib
import json
import os
import socket
import sys
import time

from gptkit.configurator import UserError

LOCK_NAME = ".gptkit.lock"
_held = {}  # folder (absolute) -> open file of its lock, for as long as this process lives
_made = set()  # the folders hold_folder created: left empty at release (a run refused at start), removed


class FolderBusyError(UserError):
    """Another process holds the folder; the message names it and what to do."""


def _try_lock(fd):
    """Take the OS lock on an open file without waiting -> True, or False when another process has it."""
    try:
        import fcntl  # POSIX only: the module does not exist on Windows
    except ImportError:  # Windows
        import msvcrt  # Windows only
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _describe(info):
    if not info:
        return "another process (it is just starting)"
    return (f"process {info.get('pid')} on {info.get('host')}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('started', 0)))}: {info.get('command')}")


def _read_info(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.readline() or "null")
    except (OSError, ValueError):
        return None


def hold_folder(folder):
    """Make this process the folder's only writer until it exits (creating the folder if needed).
    Raises FolderBusyError naming the running holder; a lock left by a dead process is taken over.
    Taking it again in the same process does nothing."""
    folder = os.path.abspath(folder)
    if folder in _held:
        return
    if not os.path.isdir(folder):
        _made.add(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    while True:
        f = open(path, "a+", encoding="utf-8")
        if not _try_lock(f.fileno()):
            f.close()
            info = _read_info(path)
            if info is None:  # the holder has the lock but has not written its name yet
                time.sleep(0.2)
                info = _read_info(path)
            raise FolderBusyError(
                f"{folder} is in use by {_describe(info)}. Two writers would corrupt it: wait for that "
                "process to finish (or stop it), or use another folder.")
        try:  # the holder before us may have removed the file between our open and our lock: then retry
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    previous = _read_info(path)
    if previous and previous.get("pid") != os.getpid():
        print(f"note: taking over {path} from {_describe(previous)}, which is no longer running", flush=True)
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time()),
                        "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}) + "\n")
    f.flush()
    _held[folder] = f


def running_holder(folder):
    """Who holds folder now, as hold_folder's refusal names it, or None: free, or held by this process.
    Takes nothing (a check before a config is known to be good, which must not create the folder)."""
    folder = os.path.abspath(folder)
    path = os.path.join(folder, LOCK_NAME)
    if folder in _held or not os.path.exists(path):
        return None
    with open(path, "a+", encoding="utf-8") as f:
        if _try_lock(f.fileno()):
            return None  # nobody: closing the file drops the lock this took
    return _describe(_read_info(path))


def release_folder(folder):
    """Give the folder up (at exit this happens by itself): remove the lock file, then drop the lock."""
    folder = os.path.abspath(folder)
    f = _held.pop(folder, None)
    if f is None:
        return
    try:
        os.remove(os.path.join(folder, LOCK_NAME))  # while still locked: no one is mid-take
    except OSError:
        pass
    f.close()  # closing drops the OS lock
    if folder in _made:  # made by this process and still empty (a bad setting stopped it): leave no trace
        _made.discard(folder)
        with contextlib.suppress(OSError):  # not empty, or another process wrote into it meanwhile
            os.rmdir(folder)


@atexit.register
def _release_all():
    for folder in list(_held):
        release_folder(folder)
