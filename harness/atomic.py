"""Every file and folder a run writes is written whole or not at all: into a temporary beside it, then renamed."""
import json
import os
import shutil
from contextlib import contextmanager


@contextmanager
def atomic(path, shared=False):
    """Yields `path + ".tmp"`, where the block writes a file or a folder; one rename then puts it at `path`, so a
    killed process leaves the old one or the new one, never half of either. An error in the block removes the
    temporary; a kill leaves it, to be overwritten by the next write. `shared`: a cache that other processes may be
    writing at the same moment (parallel runs, ranks on several machines over one home): each process writes its
    own temporary, `path + ".tmp-PID"`, so none deletes another's half-written one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}" if shared else path + ".tmp"
    _remove(tmp)
    try:
        yield tmp
        if os.path.isfile(tmp):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # the bytes on disk before the name points at them
        elif os.path.isdir(path):
            shutil.rmtree(path)  # a folder cannot be renamed onto one that holds files
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_text(path, text):
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)
