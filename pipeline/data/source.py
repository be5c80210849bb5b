"""IdentitySource: the one loader for identity data, SynthFaces output or a user's own.

Layout (the same for both):

    <root>/attributes.parquet      column `identity` (str) + one 0/1 integer column per attribute
    <root>/<identity>/<any>.png    images of that identity (png, jpg, jpeg, webp), used in sorted order

Problems raise `IdentityDataError` naming the file or identity and the fix; nothing is skipped
silently.

A source is input from somewhere else and is treated as hostile: identity names must be plain
folder names (an absolute name or one holding `..` or a path separator would make `root / name`
read outside the source), image files or identity folders that are symlinks resolving outside
the source are refused unless `follow_symlinks`, and an image whose header announces more than
`max_image_pixels` pixels (a decompression bomb) is refused before it is decoded.
"""
from __future__ import annotations

import os
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


class IdentityDataError(ValueError):
    """The identity source on disk is missing something or holds an unreadable file."""


def unsafe_name_reason(name: str) -> str | None:
    """Why `name` cannot be an identity folder name (None when it is a plain name)."""
    if not name or name in (".", ".."):
        return "is empty or a relative directory"
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        return "is an absolute path"
    if "/" in name or "\\" in name or (os.sep in name) or (os.altsep and os.altsep in name):
        return "holds a path separator"
    if ".." in name:
        return "holds '..'"
    if "\x00" in name:
        return "holds a NUL byte"
    return None


class IdentitySource:
    @classmethod
    def from_config(cls, data) -> "IdentitySource":
        """The source a config's `data` section names, read with its safety settings (symlinks,
        image size): the build, its workers and the report must all see the same identities."""
        return cls(data.source, follow_symlinks=data.follow_symlinks, max_image_pixels=data.max_image_pixels)

    def __init__(self, root: str | Path, follow_symlinks: bool = False, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        import pyarrow.parquet as pq

        self.root = Path(root)
        self.follow_symlinks = bool(follow_symlinks)
        self.max_image_pixels = int(max_image_pixels)
        if not self.root.is_dir():
            raise IdentityDataError(
                f"identity source {self.root} is not a directory: give a folder with one sub-folder of images "
                "per identity and attributes.parquet (create a synthetic one with `w2w synth OUT`)"
            )
        parquet = self.root / "attributes.parquet"
        if not parquet.is_file():
            raise IdentityDataError(
                f"{parquet} is missing: write a Parquet table with a string column 'identity' (the sub-folder "
                "names) and one 0/1 column per attribute (e.g. male, beard, young)"
            )
        try:
            table = pq.read_table(parquet)
        except Exception as err:  # noqa: BLE001
            raise IdentityDataError(f"{parquet} is not a readable Parquet file ({err}); rewrite it") from err
        if "identity" not in table.column_names:
            raise IdentityDataError(
                f"{parquet} has no 'identity' column (columns: {table.column_names}); add the sub-folder names as 'identity'"
            )
        ids = [str(v) for v in table.column("identity").to_pylist()]
        for row, ident in enumerate(ids):
            why = unsafe_name_reason(ident)
            if why:
                raise IdentityDataError(
                    f"{parquet} row {row}: identity {ident!r} {why}; identity names must be plain folder names "
                    f"inside {self.root} (it would read files outside the source): rename the folder and the row"
                )
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise IdentityDataError(f"{parquet} lists identities more than once: {dup}; keep one row per identity")
        self.attribute_names: list[str] = [c for c in table.column_names if c != "identity"]
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        self.table = table.take(order)
        self.ids: list[str] = [ids[i] for i in order]
        self._rows = {ident: i for i, ident in enumerate(self.ids)}
        self._columns = {a: self.table.column(a).to_pylist() for a in self.attribute_names}
        for a, values in self._columns.items():
            bad = [v for v in values if v not in (0, 1, True, False)]
            if bad:
                raise IdentityDataError(f"{parquet} column '{a}' holds {bad[0]!r}; attribute columns must be 0/1")

    def __len__(self) -> int:
        return len(self.ids)

    def _row(self, identity_id: str) -> int:
        try:
            return self._rows[identity_id]
        except KeyError:
            raise IdentityDataError(
                f"identity {identity_id!r} is not listed in {self.root / 'attributes.parquet'}"
            ) from None

    def attributes(self, identity_id: str) -> dict[str, int]:
        row = self._row(identity_id)
        return {a: int(self._columns[a][row]) for a in self.attribute_names}

    def _check_inside(self, path: Path, what: str) -> None:
        """Refuse a symlink that resolves outside the source (unless follow_symlinks)."""
        if self.follow_symlinks or not path.is_symlink():
            return
        target = path.resolve()
        if not target.is_relative_to(self.root.resolve()):
            raise IdentityDataError(
                f"{what} {path} is a symlink to {target}, outside the identity source {self.root}: refused "
                "(copy the file into the source, or set data.follow_symlinks=true if you trust it)"
            )

    def image_paths(self, identity_id: str) -> list[Path]:
        self._row(identity_id)
        folder = self.root / identity_id
        if not folder.is_dir():
            raise IdentityDataError(
                f"identity {identity_id!r} is listed in attributes.parquet but its folder {folder} is missing; "
                "add the folder of images or remove the row"
            )
        self._check_inside(folder, "identity folder")
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for p in paths:
            self._check_inside(p, "image")
        return paths

    def check_image_size(self, path: Path) -> None:
        """Read only the header: refuse images larger than max_image_pixels before decoding them."""
        from PIL import Image

        try:
            with Image.open(path) as opened:
                width, height = opened.size
        except Image.DecompressionBombError as err:
            raise IdentityDataError(f"decompression bomb refused: {path}: {err}; replace or delete the file") from None
        except (OSError, ValueError):
            return  # unreadable: load_image reports it with its own message
        if width * height > self.max_image_pixels:
            raise IdentityDataError(
                f"decompression bomb refused: {path} is {width} x {height} = {width * height:,} pixels, more than "
                f"data.max_image_pixels={self.max_image_pixels:,}; shrink or delete the file (or raise the limit)"
            )

    def load_images(self, identity_id: str, n: int, resolution: int):
        """The first `n` images (sorted), RGB, resized to resolution x resolution -> (k, 3, r, r) in [-1, 1]."""
        import torch

        paths = self.image_paths(identity_id)[:n]
        if not paths:
            raise IdentityDataError(
                f"identity {identity_id!r} has no images in {self.root / identity_id} "
                f"(looked for {', '.join(IMAGE_SUFFIXES)}); add images or remove the row"
            )
        from w2w_core.render import ImageError, load_image

        images = []
        for p in paths:
            self.check_image_size(p)
            try:
                images.append(load_image(p, resolution))
            except ImageError as err:
                raise IdentityDataError(f"{err} (identity {identity_id!r}); replace or delete the file") from err
        return torch.stack(images)
