"""Atomic writes of subspace files (local paths or fsspec URLs)."""
from __future__ import annotations

import io
import json

import fsspec

SUBSPACE_DIR = "subspace"


def subspace_url(out: str) -> str:
    return str(out).rstrip("/") + "/" + SUBSPACE_DIR


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write to `<url>.partial`, then rename: a reader never sees a half-written file."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = path + ".partial"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_json_atomic(url: str, obj) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


def write_safetensors_atomic(url: str, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    write_bytes_atomic(url, save(tensors, metadata={str(k): str(v) for k, v in (metadata or {}).items()}))


def write_figure_atomic(url: str, fig) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes_atomic(url, buf.getvalue())
