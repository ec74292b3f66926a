"""Reading one stored media value the way `datasets` keeps Image/Audio features."""

from __future__ import annotations

import io


def stored_source(value: dict | bytes | None) -> io.BytesIO | str:
    """A file-like object (or path) for a `{"bytes", "path"}` struct or raw bytes; bytes preferred.

    Raises ValueError when the value holds neither bytes nor a path.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        source = io.BytesIO(data) if data else path
    else:
        source = io.BytesIO(value) if value else None
    if source is None:
        raise ValueError("no bytes and no path")
    return source
