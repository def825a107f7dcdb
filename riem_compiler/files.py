"""Output files that are never seen half-written and get ordinary permissions."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, write, suffix: str = "") -> None:
    """Call `write(tmp_path)` on a temporary file in the same folder, then rename it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        public_mode(tmp)
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def public_mode(path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create owner-only entries; give them the usual umask-based mode."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)
