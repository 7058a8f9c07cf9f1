"""CI checks that the pipeline benchmark runs (its figures live in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, need

pytestmark = pytest.mark.integration


def test_pipeline_benchmark_quick_runs(tmp_path):
    need("mosquitto")
    need("influxd")
    out = subprocess.run([sys.executable, "bench/pipeline.py", "--quick", "--json",
                          str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    step = result["ramps"]["citygrid ingest+rules"][0]
    assert step["published"] > 0 and step["lost"] == 0 and step["stored"] == step["published"]
    assert step["command_samples"] > 0 and step["command_missed"] == 0
    assert result["bare_paho_drain_per_s"] > 0
    assert (tmp_path / "r.png").stat().st_size > 10_000
