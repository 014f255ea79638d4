"""Summary numbers against hand-computed values; the plot is a PNG; the viewer is self-contained and escaped."""

import json
from html.parser import HTMLParser

import pytest

from verl_hindsight.report.plots import plot_run
from verl_hindsight.report.summary import summarize
from verl_hindsight.report.viewer import build_viewer

FEEDBACK = "wrong key: the blue door opens with D & more"


def _run(root, name, vals, extra=None):
    d = root / name
    (d / "dump").mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for step in range(0, 21):
            data = {"hindsight/gap_abs_mean": 1.0 / (step + 1), "hindsight/targeted_token_frac_of_actions": 0.5}
            if step % 10 == 0:
                data["hindsight/val_success"] = vals[step // 10]
            data.update(extra or {})
            f.write(json.dumps({"step": step, "data": data}) + "\n")
    rec = {"step": 30, "experiment": name, "uid": "u", "task_id": "blue-red", "env": "toy", "success": False,
           "return": 0.5, "failure": None, "prompt": "p",
           "turns": [{"turn": 0, "observation": "Door 1 of 2 is blue.", "action": "C", "error": "wrong key",
                      "next_observation": "", "targeted": True, "feedback": FEEDBACK}],
           "tokens": [{"text": "<action>", "action": 0, "targeted": 0, "advantage": 0.1, "old_lp": -0.1,
                       "teacher_lp": None, "gap": None, "serl_weight": None, "kl": None},
                      {"text": "C", "action": 1, "targeted": 1, "advantage": 0.1, "old_lp": -1.0, "teacher_lp": -3.0,
                       "gap": -2.0, "serl_weight": 0.8, "kl": 5.39}]}
    (d / "dump" / "step_30.jsonl").write_text(json.dumps(rec) + "\n")


@pytest.fixture()
def run_dir(tmp_path):
    _run(tmp_path, "grpo-s0", [0.0, 0.5, 0.9])  # reaches 0.8 at step 20
    _run(tmp_path, "grpo-s1", [0.0, 0.1, 0.2])  # never: counted at the budget (30)
    _run(tmp_path, "hint_sd-s0", [0.0, 0.85, 0.9])  # step 10
    _run(tmp_path, "hint_sd-s1", [0.8, 0.9, 0.9])  # step 0
    return tmp_path


def test_summary_steps_medians_and_ratio(run_dir):
    text, data = summarize(run_dir, threshold=0.8, budget=30)
    grpo, hint = data["methods"]["grpo"], data["methods"]["hint_sd"]
    assert [r["steps_to_threshold"] for r in sorted(grpo["runs"], key=lambda r: r["seed"])] == [20, None]
    assert grpo["median_steps"] == 25.0  # median(20, 30)
    assert hint["median_steps"] == 5.0  # median(10, 0)
    assert data["hint_sd_over_grpo"] == pytest.approx(0.2)
    assert ">30" in text and "hint_sd" in text


def test_plot_is_a_png(run_dir):
    import matplotlib.image

    path = plot_run(run_dir)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[0] > 100


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.resources = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "img", "link", "iframe") and (attrs.get("src") or attrs.get("href")):
            self.resources.append((tag, attrs))


def test_viewer_is_self_contained_and_escapes_text(run_dir):
    page = build_viewer(run_dir).read_text()
    parser = _Collect()
    parser.feed(page)
    assert parser.resources == []  # nothing loaded from anywhere
    assert "http://" not in page and "https://" not in page
    assert "wrong key: the blue door opens with D &amp; more" in page
    assert "&lt;action&gt;" in page and "<action>" not in page
    assert "serl_weight 0.800" in page


def test_viewer_reads_verl_rollout_dumps(tmp_path):
    (tmp_path / "rollouts").mkdir()
    (tmp_path / "rollouts" / "3.jsonl").write_text(json.dumps({"input": "Q <b>", "output": "A & B", "gts": None,
                                                               "score": 1.0, "step": 3}) + "\n")
    page = build_viewer(tmp_path).read_text()
    assert "Q &lt;b&gt;" in page and "A &amp; B" in page and "score 1.000" in page
