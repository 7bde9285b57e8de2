"""The one way flashcomm writes a JSON file that others read while it may be rewritten
(tuning tables, benchmark results, a vLLM worker's running counters)."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any


def write_json_atomic(path: str, data: Any, **dump_kwargs: Any) -> None:
    """Writes ``data`` as JSON (``json.dump(data, f, **dump_kwargs)`` and a newline) to
    ``path``, creating its folder if needed.

    A reader sees the previous file or the complete new one, never a part: the text goes
    to a temporary file in the same folder (same file system), is flushed and fsynced,
    and then replaces ``path`` (``os.replace``). On any error the temporary file is
    removed and ``path`` is unchanged. The file gets the mode a plain ``open`` would give
    (0666 less the umask). Concurrent writers of one path each replace it whole.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Hidden and unique per call; O_EXCL never opens someone else's file.
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, **dump_kwargs)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
