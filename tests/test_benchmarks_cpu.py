"""The benchmarks run end to end on CPU at reduced size (the throughput ones ready for a GPU session)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

SMALL_SD15 = ["--device", "cpu", "--sd15", "--latent-size", "8", "--sd15-channels", "32,64,64,64",
              "--steps", "1", "--warmup-steps", "0", "--ref-identities", "1", "--images-per-identity", "2",
              "--class-images", "2"]


def _check(result, expected_configs):
    rows = {r["config"]: r for r in result["rows"]}
    assert set(expected_configs) <= set(rows), rows.keys()
    for name in expected_configs:
        r = rows[name]
        assert "error" not in r, r
        assert r["step_s"] > 0 and r["samples_per_s"] > 0 and r["identities_per_hour"] > 0
    assert result["machine"]["flop_per_sample"] > 0


def test_train_throughput_sd15_cpu(tmp_path):
    import train_throughput

    out = tmp_path / "bench.json"
    result = train_throughput.main(SMALL_SD15 + ["--ks", "1,2", "--json", str(out)])
    _check(result, ["reference peft (batch 1)", "batched K=1", "batched K=2"])
    saved = json.loads(out.read_text())
    assert saved["machine"]["model"].startswith("sd15") and len(saved["rows"]) == 3
    assert "| batched K=2 |" in train_throughput.markdown(result)


@pytest.mark.parametrize("toggles", ["fp32_base,no_autocast,sync_every_10"])
def test_gpu_build_cpu(toggles, tmp_path):
    import gpu_build

    out = tmp_path / "gpu.json"
    result = gpu_build.main(SMALL_SD15 + ["--ks", "2", "--max-k", "4", "--ref-batch-sizes", "1", "--toggles", toggles,
                                          "--no-flops", "--steps", "1", "--profile-steps", "1",
                                          "--inversion-steps", "2", "--inversion-components", "8", "--json", str(out)])
    rows = {r["config"]: r for r in result["rows"]}
    # K=2 fits, so the largest-K search doubles to --max-k; the toggles run at the best K measured
    best = result["machine"]["best_k"]
    assert result["machine"]["largest_k_that_fits"] == 4 and best in (2, 4)
    for name in ["reference peft (batch 1)", "batched K=2", "batched K=4"] + [
        f"batched K={best} +{t}" for t in toggles.split(",")
    ]:
        assert name in rows and "error" not in rows[name], rows.get(name)
    saved = json.loads(out.read_text())
    assert saved["machine"]["inversion"]["eager"]["steps"] == 2
    assert saved["machine"]["inversion"]["eager"]["components"] == 8
    assert saved["machine"]["profile"]["K"] == best


def test_vae_check_committed_vae_keeps_what_the_evaluators_read():
    """docs/TINY_WORLD.md rests on it: the committed VAE's reconstructions keep identity and attributes,
    so what the base cannot draw (smiles) is its UNet's limit."""
    import vae_check

    result = vae_check.main(["--identities", "24", "--threads", "1"])
    assert result["identity_cosine"] > 0.7  # same person, other photo: about 0.83
    for name, acc in result["attribute_accuracy"].items():
        assert acc["reconstructed"] >= acc["real"] - 0.15, (name, acc)


def test_tiny_batch_size_times_each_k(tmp_path):
    import tiny_batch_size

    out = tmp_path / "k.json"
    result = tiny_batch_size.main(["--ks", "1,2", "--steps", "1", "--processes", "1", "--json", str(out)])
    assert [r["identities_per_batch"] for r in result["rows"]] == [1, 2]
    assert all(len(r["ms_per_identity_step"]) == 1 and r["ms_per_identity_step"][0] > 0 for r in result["rows"])
    assert result["rows"][0]["speedup_vs_first"] == 1.0
    assert json.loads(out.read_text())["rows"] == result["rows"]


def test_inversion_study_pairs_every_fit_on_the_same_identities(tmp_path):
    """benchmarks/inversion_study.py on a planted space (a real 60k-model-like space cannot be trained here; the
    study's numbers in docs/TINY_WORLD.md come from the demo space): each w2w setting and each LoRA baseline fits the
    same held-out identities and is scored per identity, so the table's differences are paired."""
    import inversion_study
    from subspace_helpers import write_space

    space = tmp_path / "space"
    write_space(space, n=24, k=6, config={"model": {"path": "builtin:tiny"}, "train": {"prior_loss_weight": 0.0}})
    jsonl = tmp_path / "study.jsonl"
    rows = inversion_study.main([str(space), "--identities", "2", "--offset", "3", "--steps", "3", "--threads", "1",
                                 "--w2w", "constant:1,cosine:4", "--lora-lr-scales", "1,4", "--out", str(jsonl)])
    assert [(r["method"], r.get("lr_schedule"), r.get("lr_scale")) for r in rows] == [
        ("w2w", "constant", None), ("w2w", "cosine", None), ("lora", None, 1.0), ("lora", None, 4.0)]
    assert all(r["identities"] == [3, 2] and r["steps"] == 3 and len(r["per_identity"]) == 2 for r in rows)
    assert all(-1.0 <= s <= 1.0 for r in rows for s in r["per_identity"])
    assert rows[0]["coefficient_norm"] != rows[1]["coefficient_norm"], "the two w2w settings made the same fit"
    assert rows[2]["per_identity"] != rows[3]["per_identity"], "the lr scale did not reach the LoRA baseline"
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == rows
    with pytest.raises(SystemExit, match="SCHEDULE:LR"):
        inversion_study.main([str(space), "--w2w", "linear:2"])
