"""`verl-hindsight demo --quick` end to end: every method runs through stock main_ppo and the run folder holds
well-formed outputs. Its three runs also carry the checks of the default toy recipes (the text loop's spans, SERL's
estimator, HINT-SD's top-k distillation), so the suite launches main_ppo for them once."""

import json
import math
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
    train = {}
    for method in ("grpo", "hint_sd", "serl"):
        rows = [json.loads(line) for line in (run_dir / f"{method}-s0" / "metrics.jsonl").read_text().splitlines()]
        assert {r["step"] for r in rows} >= {1, 2}, method
        assert any("hindsight/val_success" in r["data"] for r in rows), method
        assert list((run_dir / f"{method}-s0" / "dump").glob("step_*.jsonl")), method
        train[method] = [r["data"] for r in rows if "hindsight/rows" in r["data"]]  # step 0 is validation only
        assert len(train[method]) == 2, method
        for m in train[method]:
            # the toy's text loop under every method: a turn record and an action mask on every row, action tokens
            # never on observation text (2 tasks x 2 rollouts per step in the quick demo)
            assert m["hindsight/rows"] == 4, method
            assert m["hindsight/rows_with_turn_records"] == 1.0 and m["hindsight/rows_with_action_mask"] == 1.0
            assert m["hindsight/action_tokens_on_observation"] == 0.0
            assert 0.0 < m["hindsight/action_token_frac"] < 1.0 and m["hindsight/turns_mean"] >= 1.0
            assert m.get("hindsight/env_failures", 0.0) == 0.0
            assert all(math.isfinite(float(v)) for k, v in m.items() if k.startswith(("hindsight/", "actor/",
                                                                                        "serl/"))), method
    # SERL's registered estimator wrote the advantages (serl/* come only from it) and changed nothing outside the
    # hindsight mask; lambda decays from 0.5 over 50 updates
    assert [m["serl/lambda"] for m in train["serl"]] == [0.5, pytest.approx(0.49)]
    for m in train["serl"]:
        assert m["serl/changed_tokens_outside_hindsight_mask"] == 0.0
        assert m["serl/changed_tokens"] <= m["serl/hindsight_tokens"]
    # HINT-SD's topk_tail distillation through verl's logits hook: teacher top-k (reference pass -> TransferQueue)
    # and student logits line up. The message span's format tokens are near-certain for both models, so the
    # student's mass on the teacher's top-k is near 1; a one-position shift would put it near 0 on those tokens
    for m in train["hint_sd"]:
        assert m["actor/hindsight/distill_coef"] == 1.0 and m["hindsight/targeted_tokens"] > 0
        assert m["actor/hindsight/distill_loss"] >= 0.0  # a KL is non-negative
        assert m["actor/hindsight/topk_teacher_mass"] > 0.9 and m["actor/hindsight/topk_student_mass"] > 0.9
    assert any(m["actor/hindsight/distill_loss"] > 0 for m in train["hint_sd"])
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
