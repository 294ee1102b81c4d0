"""The index manifest (`manifest.json`): what was built from what, and checks that a serve matches it."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from autorefine.files import file_sha256, write_json
from retriever_server.corpus import OFFSETS_FILE, CorpusScan, corpus_fingerprint
from retriever_server.encoders import BM25, EncoderSpec, is_embedded, model_fingerprint, resolve_encoder_spec

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_VERSIONED_PACKAGES = ("numpy", "faiss-cpu", "faiss-gpu-cu12", "torch", "transformers", "bm25s", "autorefine")


class ManifestMismatch(ValueError):
    """An index does not belong to the corpus or encoder it is being used with."""


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape an index (those installed)."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def read_manifest(index_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load `manifest.json` of an index directory; a clear error when it is not a finished index."""
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestMismatch(
            f"{index_dir} is not a finished index (no {MANIFEST_FILE}); run `retriever-server build`"
        )
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except ValueError as err:
        raise ManifestMismatch(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestMismatch(f"{path}: unsupported format_version {manifest.get('format_version')!r}")
    return manifest


def new_manifest(
    scan: CorpusScan, encoder: dict[str, Any], index: dict[str, Any], skip_malformed: bool, seconds: float
) -> dict[str, Any]:
    """The manifest of an index just built or imported: its corpus, encoder and index sections, and how."""
    return {
        "format_version": FORMAT_VERSION,
        "corpus": scan.to_manifest(),
        "encoder": encoder,
        "dim": encoder.get("dim"),
        "index": index,
        "offsets": OFFSETS_FILE,
        "build": {
            "skip_malformed": skip_malformed,
            "seconds": round(seconds, 3),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "versions": package_versions(),
    }


def write_manifest(index_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Write `manifest.json` atomically: its presence marks a finished index."""
    write_json(Path(index_dir) / MANIFEST_FILE, manifest)


def _differs(path: Path, recorded: dict[str, Any]) -> str | None:
    """How `path` differs from the file a manifest entry recorded (size, then first/last-MiB fingerprint)."""
    size = path.stat().st_size
    if size != recorded["size_bytes"]:
        return f"size {size} bytes against {recorded['size_bytes']} recorded"
    if corpus_fingerprint(path) != recorded["fingerprint"]:
        return "same size but different content (fingerprint of the first/last MiB)"
    return None


def check_corpus(
    manifest: dict[str, Any], corpus: str | os.PathLike[str], *, full_hash: bool = False
) -> None:
    """Raise ManifestMismatch unless `corpus` is the file the index was built from (size, fingerprint, sha256)."""
    recorded = manifest["corpus"]
    path = Path(corpus)
    if not path.is_file():
        raise ManifestMismatch(f"corpus file not found: {path} (the index was built from {recorded['path']})")
    difference = _differs(path, recorded)
    if difference:
        raise ManifestMismatch(
            f"corpus {path} does not match the index manifest: {difference}; "
            f"the index was built from {recorded['path']}"
        )
    if full_hash and file_sha256(path) != recorded["sha256"]:
        raise ManifestMismatch(
            f"corpus {path} does not match the index manifest: sha256 differs from {recorded['sha256']}"
        )


def check_index_file(manifest: dict[str, Any], index_dir: str | os.PathLike[str]) -> None:
    """Raise ManifestMismatch unless an imported FAISS file is still the one imported (size, fingerprint).

    Indexes we build live inside the index directory and record no fingerprint; imported ones may be a
    reference to a file elsewhere, which can move or be replaced like a corpus file can.
    """
    info = manifest["index"]
    if "fingerprint" not in info:
        return
    path = Path(index_dir) / info["path"]  # an absolute path (a reference) stays as it is
    source = info.get("imported", {}).get("source", path)
    if not path.is_file():
        raise ManifestMismatch(
            f"index file not found: {path} (imported from {source}); "
            "put it back or import it again with `retriever-server build --import-faiss FILE --force`"
        )
    difference = _differs(path, info)
    if difference:
        raise ManifestMismatch(
            f"index file {path} does not match the index manifest: {difference}; it was imported from {source}"
        )


def manifest_encoder(manifest: dict[str, Any]) -> EncoderSpec | None:
    """The recorded dense encoder spec, or None for a BM25 index."""
    encoder = manifest["encoder"]
    return None if encoder.get("family") == BM25 else EncoderSpec.from_dict(encoder)


def check_encoder(manifest: dict[str, Any], encoder: str | None) -> EncoderSpec | None:
    """The spec to serve with: the manifest's, after checking that `encoder` (when named) is the same model."""
    recorded = manifest_encoder(manifest)
    if encoder is None:
        return recorded
    if encoder.lower() == BM25 or recorded is None:
        if (encoder.lower() == BM25) != (recorded is None):
            built = "BM25" if recorded is None else f"dense encoder {recorded.name!r}"
            raise ManifestMismatch(
                f"encoder {encoder!r} does not match the index, which was built with {built}"
            )
        return recorded
    # Same conventions are required; the model itself may live at another path if its files are the same.
    given = resolve_encoder_spec(
        encoder, family=recorded.family, pooling=recorded.pooling, max_length=recorded.max_length
    )
    same_name = given.name == recorded.name or (is_embedded(given.name) and is_embedded(recorded.name))
    recorded_fp = manifest["encoder"].get("fingerprint")
    same_files = recorded_fp is not None and model_fingerprint(given.name) == recorded_fp
    if not (same_name or same_files):
        raise ManifestMismatch(
            f"encoder {encoder!r} does not match the index, which was built with {recorded.name!r}"
        )
    return recorded if same_name else replace(recorded, name=given.name)
