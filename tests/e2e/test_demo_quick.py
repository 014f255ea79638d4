"""`verl-hindsight demo --quick` end to end: every method runs through stock main_ppo and the run folder holds
well-formed outputs."""

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_quick_produces_metrics_plot_viewer_and_summary(tmp_path):
    run_dir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "verl_hindsight.cli", "demo", "--quick", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    for method in ("grpo", "hint_sd", "serl"):
        rows = [json.loads(line) for line in (run_dir / f"{method}-s0" / "metrics.jsonl").read_text().splitlines()]
        assert {r["step"] for r in rows} >= {1, 2}, method
        assert any("hindsight/val_success" in r["data"] for r in rows), method
        assert list((run_dir / f"{method}-s0" / "dump").glob("step_*.jsonl")), method
    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    html = (run_dir / "viewer.html").read_text()
    HTMLParser().feed(html)  # parses
    # the feedback the HINT-SD teacher saw is in the viewer (escaped the way the viewer writes text)
    dumps = [json.loads(line) for p in (run_dir / "hint_sd-s0" / "dump").glob("step_*.jsonl")
             for line in p.read_text().splitlines()]
    inserted = [t["feedback"] for d in dumps for t in d["turns"] if t["feedback"]]
    assert inserted, "no HINT-SD turn was targeted in the quick demo"
    import html as html_lib

    assert html_lib.escape(inserted[0]) in html
    summary = (run_dir / "summary.txt").read_text()
    for method in ("grpo", "hint_sd", "serl"):
        assert method in summary
    assert json.loads((run_dir / "warm_start.json").read_text())["steps"] == 80
    assert "summary" in proc.stdout.lower() or "viewer" in proc.stdout.lower()
