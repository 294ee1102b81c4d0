"""Public API for using an index's encoders in another program's process (e.g. a trainer's process score).

Searching goes through the HTTP server; this is for programs that need the same embeddings locally, such as
the process score of IP-DPO, which compares gold evidence with trajectory text. Everything else in this
package is the server's own business and may change.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class PassageEncoder(Protocol):
    """Embeds texts as passages: one L2-normalized float32 row per text."""

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        """`(len(texts), dim)` unit vectors."""
        ...


def encoder_name(name: str | None = None) -> str:
    """The name an encoder is known by (`None` or an alias: the embedded all-MiniLM-L6-v2)."""
    from retriever_server.encoders import EMBEDDED_NAME, is_embedded

    return EMBEDDED_NAME if is_embedded(name) else str(name)


def load_passage_encoder(
    name: str | None = None, *, device: str | None = None, batch_size: int = 64
) -> PassageEncoder:
    """A dense encoder by model name or path (default: the embedded all-MiniLM-L6-v2, offline)."""
    from retriever_server.encoders import DenseEncoder, resolve_encoder_spec

    return DenseEncoder(resolve_encoder_spec(name), batch_size=batch_size, device=device)
