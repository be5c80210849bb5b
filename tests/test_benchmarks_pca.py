"""The PCA scale benchmark runs end to end at a tiny size (seconds) and reports accurate components."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pca_scale_benchmark_small(tmp_path):
    out = tmp_path / "results.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pca_scale.py"), "--rows", "64", "--dims", "300",
         "--components", "4", "--rank", "6", "--chunk-rows", "16", "--block-rows", "16",
         "--accuracy-rows", "40", "--max-gram-gb", "1e-4", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    runs = {(x["method"], x["rows"]): x for x in res["runs"]}
    assert "skipped" in runs[("gram", 64)]  # 5 x 64^2 x 8 B > 1e-4 GiB > 5 x 40^2 x 8 B: the memory guard
    assert runs[("randomized", 64)]["wall_s"] > 0 and runs[("randomized", 64)]["peak_rss_gb"] > 0
    assert "wall_s" in runs[("gram", 40)]
    acc = res["reference"]["accuracy"]
    for method in ("gram", "randomized"):
        assert acc[method]["max_principal_angle_deg"] < 0.5, acc
        assert acc[method]["max_rel_err_singular_values"] < 1e-4, acc
