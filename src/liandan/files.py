"""Files liandan writes and reads: atomic writes, content hashes, and its cache directory.

    from liandan.files import write_atomic, file_sha256, liandan_home
    write_atomic(Path("report.html"), html)     # a failure never leaves a half-written file
    file_sha256(Path("model.safetensors"))       # recorded in run manifests and cache keys
    liandan_home() / "replay"                    # $LIANDAN_HOME, or ~/.cache/liandan
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path`` and rename it into place, so a
    reader sees the old file or the whole new one, never half of it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def liandan_home() -> Path:
    """The cache directory: ``$LIANDAN_HOME``, or ``~/.cache/liandan``."""
    return Path(os.environ.get("LIANDAN_HOME") or Path.home() / ".cache" / "liandan").expanduser()
