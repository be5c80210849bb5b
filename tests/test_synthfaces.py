"""SynthFaces generator and the IdentitySource loader."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.source import IdentityDataError, IdentitySource
from pipeline.data.synthfaces import ATTRIBUTE_NAMES, render, sample_identity, with_attribute, write_identity_source


def test_deterministic_and_distinct():
    a = render(sample_identity(0, 3), 2)
    b = render(sample_identity(0, 3), 2)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(sample_identity(0, 4), 2))
    assert not np.array_equal(a, render(sample_identity(1, 3), 2))  # other seed, other identity
    assert not np.array_equal(a, render(sample_identity(0, 3), 3))  # other image of the same identity


def test_attribute_correlations():
    idents = [sample_identity(7, i) for i in range(2000)]
    attrs = np.array([[p.attributes[a] for a in ATTRIBUTE_NAMES] for p in idents])
    col = {a: attrs[:, i] for i, a in enumerate(ATTRIBUTE_NAMES)}
    assert np.all(col["male"][col["beard"] == 1] == 1)
    assert col["beard"].sum() > 50
    assert 0.01 < col["pale_skin"].mean() < 0.10
    assert 0.3 < col["male"].mean() < 0.6
    assert col["bangs"][col["male"] == 1].mean() < col["bangs"][col["male"] == 0].mean()


def test_with_attribute_is_the_same_person_with_one_attribute_flipped():
    """The report's perfect edit: only the flipped attribute and the traits tied to it change, and
    flipping back gives the identity (and its images) again."""
    people = [sample_identity(5, i) for i in range(60)]
    young = next(p for p in people if p.attributes["young"] and not p.attributes["eyeglasses"])
    glasses = with_attribute(young, "eyeglasses", 1)
    assert glasses.attributes == {**young.attributes, "eyeglasses": 1}
    assert all(np.array_equal(np.asarray(glasses.traits[k]), np.asarray(v)) for k, v in young.traits.items())
    changed = (render(glasses, 0) != render(young, 0)).any(-1)
    assert 0 < changed.mean() < 0.3  # the glasses, not the whole face
    old = with_attribute(young, "young", 0)
    assert np.abs(old.traits["hair"] - young.traits["hair"]).max() > 0.05  # hair greys with age
    assert np.array_equal(render(with_attribute(old, "young", 1), 1), render(young, 1))
    man = next(p for p in people if p.attributes["male"] and p.attributes["beard"])
    woman = with_attribute(man, "male", 0)
    assert woman.attributes["beard"] == 0 and woman.traits["hair_long"] > 0.3 and woman.traits["jaw"] < man.traits["jaw"]
    again = with_attribute(with_attribute(woman, "male", 1), "beard", 1)
    for key in ("face_w", "jaw", "brow_thick", "hair_long", "lip"):
        np.testing.assert_allclose(again.traits[key], man.traits[key], atol=1e-12)
    with pytest.raises(ValueError, match="male identities only"):
        with_attribute(woman, "beard", 1)
    with pytest.raises(ValueError, match="unknown SynthFaces attribute 'hat'"):
        with_attribute(man, "hat", 1)


def test_write_and_load_synth(tmp_path):
    write_identity_source(tmp_path, 3, 4, seed=5)
    src = IdentitySource(tmp_path)
    assert src.ids == sorted(src.ids) and len(src.ids) == 3 and src.ids[0] == "s5_000000"
    assert src.attribute_names == list(ATTRIBUTE_NAMES)
    assert src.table.schema.field("male").type == pa.int8()
    x = src.load_images(src.ids[1], 10, 64)  # only 4 exist -> use what exists
    assert x.shape == (4, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert set(src.attributes(src.ids[0])) == set(ATTRIBUTE_NAMES)


def _user_folder(root, ids=("bob", "alice")):
    for j, ident in enumerate(ids):
        (root / ident).mkdir(parents=True)
        for k in range(3):
            arr = np.full((80, 100, 3), 40 * k + j, np.uint8)
            Image.fromarray(arr).save(root / ident / f"img{k}.jpg")
    pq.write_table(pa.table({"identity": list(ids), "male": pa.array([1, 0], pa.int8())}), root / "attributes.parquet")


def test_user_style_folder(tmp_path):
    _user_folder(tmp_path)
    src = IdentitySource(tmp_path)
    assert src.ids == ["alice", "bob"]
    assert src.attributes("bob") == {"male": 1}
    assert [p.name for p in src.image_paths("alice")] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    x = src.load_images("alice", 2, 32)
    assert x.shape == (2, 3, 32, 32)


def test_corrupt_image_names_file(tmp_path):
    _user_folder(tmp_path)
    (tmp_path / "bob" / "img0.jpg").write_bytes(b"not an image")
    src = IdentitySource(tmp_path)
    with pytest.raises(IdentityDataError, match="img0.jpg"):
        src.load_images("bob", 3, 64)


def test_missing_parquet_and_folder_and_no_images(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(IdentityDataError, match="attributes.parquet"):
        IdentitySource(tmp_path)
    pq.write_table(pa.table({"identity": ["x", "y"], "male": [0, 1]}), tmp_path / "attributes.parquet")
    src = IdentitySource(tmp_path)
    with pytest.raises(IdentityDataError, match="no images"):
        src.load_images("x", 3, 64)
    with pytest.raises(IdentityDataError, match="folder"):
        src.load_images("y", 3, 64)
    with pytest.raises(IdentityDataError, match="'z'"):
        src.attributes("z")


def test_generator_speed():
    import time

    ident = sample_identity(0, 0)
    t = time.perf_counter()
    for k in range(100):
        render(ident, k)
    assert 100 / (time.perf_counter() - t) > 100  # >= 200/s unloaded; loose bound on a busy machine
