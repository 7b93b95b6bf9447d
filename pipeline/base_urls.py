"""What a model's ``base_url`` must look like, checked when the config is validated: an
``http://`` or ``https://`` URL with a host. ``localhost:8000/v1`` would otherwise pass
validation and fail every record (``localhost`` read as the scheme)."""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["base_url_problem"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def base_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a base_url, with the fix, or None. Credentials in it are never shown."""
    text = url.strip()
    match = _SCHEME.match(text)
    if match is None:
        fixed = "http:" + text if text.startswith("//") else "http://" + text
        return (f"base_url {_shown(text)!r} has no scheme; write it with http:// or https://, "
                f"e.g. base_url: {_shown(fixed)}")
    scheme = match.group(1).lower()
    if scheme not in ("http", "https"):
        return (f"base_url starts with {scheme}://; an OpenAI-compatible server is reached over http:// or "
                f"https://, e.g. base_url: http://{_shown(text[match.end():])}")
    try:
        host = urllib.parse.urlsplit(text).hostname
    except ValueError:
        host = None
    if not host:
        return f"base_url {_shown(text)!r} has no host; write it like http://localhost:8000/v1"
    return None


def _shown(text: str) -> str:
    """``text`` with any user:password@ blanked."""
    return re.sub(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?[^/@]*@", lambda m: (m.group(1) or "") + "***@", text)
