"""Hostile identity sources (issue 17 item 4): names that escape the source, symlinks that point
outside it, decompression bombs. Real files on disk, the builder's own code path (`plan_build`,
`TrainerContext` + `train_shard`, the `w2w build` command); no Ray needed (all of it is refused
or quarantined before any training)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.source import IdentityDataError, IdentitySource

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def source(tmp_path):
    from pipeline.data.synthfaces import write_identity_source

    return write_identity_source(tmp_path / "identities", 4, 2, seed=0)


def _cfg(source, out, *extra):
    from pipeline.builder.builder import absolutize
    from pipeline.config import load_config

    return absolutize(load_config(REPO / "conf/tiny.yaml", [
        f"data.source={source}", "data.images_per_identity=2", f"build.out={out}", "build.trainer=synthetic",
        "build.synthetic_layout=tiny", "build.rows_per_shard=4", *extra]))


def _shard(source, tmp_path, *extra):
    """What a build worker does with shard 0 (all 4 identities): -> ShardResult."""
    from pipeline.builder.builder import plan_build
    from pipeline.builder.worker import TrainerContext, train_shard

    cfg = _cfg(source, tmp_path / "out", *extra)
    plan = plan_build(cfg)
    return plan.ids, train_shard(TrainerContext.create(cfg), plan.shard_ids(0))


def _rename_identity(source: Path, new_name: str) -> None:
    table = pq.read_table(source / "attributes.parquet")
    ids = table.column("identity").to_pylist()
    ids[1] = new_name
    pq.write_table(table.set_column(0, "identity", pa.array(ids, pa.string())), source / "attributes.parquet")


@pytest.mark.parametrize("name", ["/etc", "../outside", "a/b", "..", "x..y", "a\\b"])
def test_identity_names_that_escape_the_source_are_refused(source, tmp_path, name, capsys):
    _rename_identity(source, name)
    with pytest.raises(IdentityDataError) as err:
        IdentitySource(source)
    assert repr(name) in str(err.value) and "plain folder names" in str(err.value)
    # the CLI refuses the whole build with that one line, before Ray or any store exists
    from jobs.cli import main

    out = tmp_path / "store"
    assert main(["build", "conf/tiny.yaml", f"data.source={source}", f"build.out={out}", "build.trainer=synthetic",
                 "build.synthetic_layout=tiny", "--no-progress"]) == 2
    assert "plain folder names" in capsys.readouterr().err
    assert not out.exists()


def test_symlinks_outside_the_source_are_refused_unless_allowed(source, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    ids = sorted(p.name for p in source.iterdir() if p.is_dir())
    # identity 1: an image symlinked to a file outside the source
    victim = sorted((source / ids[1]).iterdir())[0]
    target = outside / "photo.png"
    target.write_bytes(victim.read_bytes())
    victim.unlink()
    victim.symlink_to(target)
    # identity 2: an image symlinked to another identity's image inside the source: fine
    inner = sorted((source / ids[2]).iterdir())[0]
    inner.unlink()
    inner.symlink_to(sorted((source / ids[0]).iterdir())[0])
    # identity 3: the whole folder is a symlink to a folder outside
    moved = outside / "folder"
    (source / ids[3]).rename(moved)
    (source / ids[3]).symlink_to(moved, target_is_directory=True)

    _, result = _shard(source, tmp_path)
    assert sorted(result.quarantined) == [ids[1], ids[3]]
    assert "symlink" in result.quarantined[ids[1]] and str(target) in result.quarantined[ids[1]]
    assert "data.follow_symlinks=true" in result.quarantined[ids[1]]
    assert "identity folder" in result.quarantined[ids[3]]
    _, allowed = _shard(source, tmp_path, "data.follow_symlinks=true")
    assert allowed.quarantined == {}


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header announces width x height (a few hundred bytes on disk): a decompression
    bomb as far as any decoder is concerned, made without ever allocating its pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width,height", [(9000, 9000), (100_000, 100_000)])  # over our limit; over PIL's too
def test_decompression_bomb_is_quarantined_not_decoded(source, tmp_path, width, height):
    import resource

    ids = sorted(p.name for p in source.iterdir() if p.is_dir())
    bomb = sorted((source / ids[2]).iterdir())[0]
    _png_header_only(bomb, width, height)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, result = _shard(source, tmp_path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert list(result.quarantined) == [ids[2]]
    assert "decompression bomb" in result.quarantined[ids[2]] and bomb.name in result.quarantined[ids[2]]
    assert grown_mb < 200, f"the bomb was decoded? peak RSS grew by {grown_mb:.0f} MB"
    # a larger limit lets the 9000 x 9000 header through to the decoder, which then fails on the
    # truncated data: still quarantined, but as unreadable, proving the limit is what refused it above
    if width == 9000:
        _, result = _shard(source, tmp_path, "data.max_image_pixels=100000000")
        assert list(result.quarantined) == [ids[2]] and "decompression bomb" not in result.quarantined[ids[2]]
