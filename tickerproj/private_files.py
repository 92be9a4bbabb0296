"""Files holding secrets, created private from their first byte."""

import os
from pathlib import Path


def private_file_create(path: Path, text: str) -> None:
    """Write ``text`` to a new file readable by its owner only (0600 from creation on).

    ``O_EXCL`` refuses an existing file or a symlink planted in its place, so the secret is
    never written through a link to somewhere else, nor exposed between a write and a chmod.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
