"""No silent overwrite of results (issue 17 item 5): every command that writes a result refuses
to replace an existing one unless --force (naming how to write elsewhere), and `w2w invert`'s
default LoRA folder gets a unique name (/a/0.jpg and /b/0.png both used to land in
OUT/inversions/0/, the second silently replacing the first).

A small real space: a planted store written through the store contract, `w2w pca` and
`w2w directions` on it, the embedded tiny base model rendering 1-step grids.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from subspace_helpers import planted_data, tiny_layout, write_store


@pytest.fixture(scope="module")
def space_dir(tmp_path_factory):
    from jobs.cli import main

    out = tmp_path_factory.mktemp("space")
    x, labels, _ = planted_data(24, tiny_layout().numel, rank=4, noise=0.2, seed=3)
    write_store(out, x, labels)
    assert main(["pca", str(out), "-k", "4"]) == 0
    assert main(["directions", str(out)]) == 0
    return out


def _run(capsys, *argv):
    from jobs.cli import main

    rc = main(list(argv))
    return rc, capsys.readouterr().err


def _refused(rc, err, path, hint=""):
    assert rc == 2, err
    assert f"{path} already exists" in err and "--force" in err and hint in err


def test_pca_and_directions_refuse_then_force(space_dir, capsys):
    pca_json = space_dir / "subspace" / "pca.json"
    before = pca_json.read_bytes()
    rc, err = _run(capsys, "pca", str(space_dir), "-k", "3")
    _refused(rc, err, f"{space_dir}/subspace/pca.json", "w2w directions")
    assert pca_json.read_bytes() == before
    directions = space_dir / "subspace" / "directions.json"
    before = directions.read_bytes()
    rc, err = _run(capsys, "directions", str(space_dir), "--method", "logistic")
    _refused(rc, err, f"{space_dir}/subspace/directions.json")
    assert directions.read_bytes() == before
    assert _run(capsys, "directions", str(space_dir), "--method", "logistic", "--force")[0] == 0
    assert json.loads(directions.read_text()) != json.loads(before)


def test_invert_same_stem_gets_unique_folders(space_dir, tmp_path, capsys):
    for sub, suffix, value in (("a", "jpg", 40), ("b", "png", 200)):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(tmp_path / sub / f"0.{suffix}")
    common = ["--steps", "1", "--render-steps", "1", "--components", "3"]
    assert _run(capsys, "invert", str(space_dir), str(tmp_path / "a" / "0.jpg"), *common, "--out", str(tmp_path / "a.png"))[0] == 0
    first = space_dir / "inversions" / "0"
    first_bytes = (first / "w2w_model.safetensors").read_bytes()
    assert _run(capsys, "invert", str(space_dir), str(tmp_path / "b" / "0.png"), *common, "--out", str(tmp_path / "b.png"))[0] == 0
    second = space_dir / "inversions" / "0-2"
    assert (first / "w2w_model.safetensors").read_bytes() == first_bytes  # the first result survived
    assert json.loads((first / "inversion.json").read_text())["image"].endswith("a/0.jpg")
    assert json.loads((second / "inversion.json").read_text())["image"].endswith("b/0.png")
    # explicit destinations that exist are refused (grid, --save-lora), --force replaces
    rc, err = _run(capsys, "invert", str(space_dir), str(tmp_path / "b" / "0.png"), *common, "--out", str(tmp_path / "a.png"))
    _refused(rc, err, tmp_path / "a.png", "--out NEW.png")
    rc, err = _run(capsys, "invert", str(space_dir), str(tmp_path / "b" / "0.png"), *common, "--out", str(tmp_path / "c.png"),
                   "--save-lora", str(first))
    _refused(rc, err, first, "--save-lora DIR")
    assert (first / "w2w_model.safetensors").read_bytes() == first_bytes
    assert _run(capsys, "invert", str(space_dir), str(tmp_path / "b" / "0.png"), *common, "--out", str(tmp_path / "c.png"),
                "--save-lora", str(first), "--force")[0] == 0
    assert (first / "w2w_model.safetensors").read_bytes() != first_bytes


def test_sample_edit_report_refuse_existing(space_dir, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert _run(capsys, "sample", str(space_dir), "--n", "1", "--render-steps", "1", "--out", str(grid),
                "--save-loras", str(tmp_path / "loras"))[0] == 0
    before = grid.read_bytes()
    rc, err = _run(capsys, "sample", str(space_dir), "--n", "1", "--render-steps", "1", "--out", str(grid), "--sample-seed", "5")
    _refused(rc, err, grid, "--out NEW.png")
    rc, err = _run(capsys, "sample", str(space_dir), "--n", "1", "--render-steps", "1", "--out", str(tmp_path / "other.png"),
                   "--save-loras", str(tmp_path / "loras"))
    _refused(rc, err, f"{tmp_path / 'loras'}/sample_0", "--save-loras DIR")
    rc, err = _run(capsys, "edit", str(space_dir), "--attribute", "male", "--strengths=0", "--render-steps", "1",
                   "--out", str(grid))
    _refused(rc, err, grid, "--out NEW.png")
    assert grid.read_bytes() == before
    assert _run(capsys, "edit", str(space_dir), "--attribute", "male", "--strengths=0", "--render-steps", "1",
                "--out", str(grid), "--force")[0] == 0
    assert grid.read_bytes() != before
    report = space_dir / "report" / "report.md"
    report.parent.mkdir(exist_ok=True)
    report.write_text("an earlier report")
    rc, err = _run(capsys, "report", str(space_dir))
    _refused(rc, err, report)
    assert report.read_text() == "an earlier report"
