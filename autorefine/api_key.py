"""The retriever's bearer token: one reader for the client (trainer side) and the server."""

from __future__ import annotations

import os
from pathlib import Path

API_KEY_ENV = "AUTOREFINE_RETRIEVER_API_KEY"


class ApiKeyError(ValueError):
    """The API key file cannot be read or is empty."""


def read_api_key(api_key_file: str | os.PathLike[str] | None, *, setting: str = "api key file") -> str | None:
    """The token in `api_key_file`, else in ${AUTOREFINE_RETRIEVER_API_KEY}, else None (no token).

    `setting` names where the file was given (`retriever.api_key_file`, `--api-key-file`) in error messages.
    """
    if api_key_file:
        path = Path(api_key_file).expanduser()
        try:
            token = path.read_text("utf-8").strip()
        except OSError as err:
            raise ApiKeyError(f"{setting} {path}: {err.strerror or err}") from None
        if not token:
            raise ApiKeyError(f"{setting} {path} is empty")
        return token
    return os.environ.get(API_KEY_ENV, "").strip() or None
