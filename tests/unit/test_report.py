"""The demo's outputs on a synthetic run folder: summary numbers against hand-computed values, the plot is a real PNG
with the right curves, the viewer is self-contained, well-formed and escapes model text; a folder holding only verl's
own rollout dumps renders too."""

import json
from html.parser import HTMLParser

import pytest

from verl_hindsight.report.plots import plot_ablation, plot_ablations, plot_run
from verl_hindsight.report.summary import summarize
from verl_hindsight.report.viewer import build_viewer

FEEDBACK = "wrong key: the blue door opens with D"
TOKEN_TEXT = "<action>A & B"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# validation success at test steps 0, 10, 20, 30 (training steps 0..30)
VALS = {
    "grpo-s0": [0.0, 0.5, 0.9, 0.9],  # reaches 0.8 at step 20
    "grpo-s1": [0.0, 0.1, 0.2, 0.3],  # never: counts at the budget
    "hint_sd-s0": [0.0, 0.85, 0.9, 1.0],  # step 10
    "hint_sd-s1": [0.0, 0.7, 0.8, 0.9],  # step 20 (exactly at the threshold counts)
}


def _token(text, action, targeted, kl=None, weight=None):
    return {"text": text, "action": action, "targeted": targeted, "advantage": 0.25, "old_lp": -1.0,
            "teacher_lp": -3.0 if targeted else None, "gap": -2.0 if targeted else None, "serl_weight": weight,
            "kl": kl}


def _dump(run, step, n, serl=False, hindsight=True):
    """``n`` trajectories; GRPO (``hindsight=False``) has no targeted turns and no per-token teacher values."""
    recs = []
    for i in range(n):
        recs.append({
            "step": step, "experiment": f"toy_{run}", "uid": f"u{step}-{i}", "task_id": f"blue-red-{step}-{i}",
            "env": "toy", "success": i % 2 == 0, "return": 0.5, "failure": None, "prompt": "Door 1 of 2 is blue.",
            "turns": [{"turn": 0, "observation": "Door 1 of 2 is blue.", "action": "C", "error": "wrong key",
                       "next_observation": "Key C does not open door 1.", "targeted": hindsight,
                       "feedback": FEEDBACK if hindsight else None},
                      {"turn": 1, "observation": "Door 1 of 2 is blue.", "action": "D", "error": None,
                       "next_observation": "", "targeted": False, "feedback": None}],
            "tokens": [_token(TOKEN_TEXT, 0, 0),
                       _token("C", 1, int(hindsight), kl=5.39 if hindsight else None,
                              weight=0.8 if serl else None),
                       _token("</action>", 0, 0)]})
    return "".join(json.dumps(r) + "\n" for r in recs)


def _metrics(run, vals, val_key="hindsight/val_success", hindsight=True):
    lines = []
    for step in range(0, 31):
        data = {"hindsight/env_success": step / 30}
        if hindsight:
            data.update({"hindsight/gap_abs_mean": 2.0 / (step + 1), "hindsight/targeted_token_frac_of_response": 0.5})
        if step % 10 == 0:
            data[val_key] = vals[step // 10]
            data["val-aux/toy/num_turns/mean"] = 2.0
        lines.append(json.dumps({"step": step, "data": data}))
    return "\n".join(lines) + "\n"


@pytest.fixture()
def run_dir(tmp_path):
    for name, vals in VALS.items():
        d = tmp_path / name
        (d / "dump").mkdir(parents=True)
        hindsight = name.startswith("hint_sd")
        # one run logs only verl's own validation metric: the fallback key is used
        key = "val-core/toy/reward/mean@1" if name == "hint_sd-s1" else "hindsight/val_success"
        (d / "metrics.jsonl").write_text(_metrics(name, vals, key, hindsight))
        for step in (1, 2):
            (d / "dump" / f"step_{step}.jsonl").write_text(_dump(name, step, 2, hindsight=hindsight))
    serl = tmp_path / "serl-s0" / "dump"  # a dump without metrics: viewer only
    serl.mkdir(parents=True)
    (serl / "step_3.jsonl").write_text(_dump("serl", 3, 2, serl=True))
    return tmp_path


def test_summary_steps_medians_and_ratio(run_dir):
    text, data = summarize(run_dir, threshold=0.8)
    grpo, hint = data["methods"]["grpo"], data["methods"]["hint_sd"]
    assert [r["steps_to_threshold"] for r in grpo["runs"]] == [20, None]
    assert [r["steps_to_threshold"] for r in hint["runs"]] == [10, 20]
    assert [r["final"] for r in grpo["runs"]] == [0.9, 0.3]
    assert [r["val_key"] for r in hint["runs"]] == ["hindsight/val_success", "val-core/toy/reward/mean@1"]
    assert grpo["median_steps"] == 25.0  # median(20, 30): the stalled seed counts at its last step
    assert hint["median_steps"] == 15.0  # median(10, 20)
    assert grpo["reached"] == 1 and hint["reached"] == 2
    assert data["hint_sd_over_grpo"] == pytest.approx(0.6)
    assert ">30" in text and "hint_sd / grpo median steps: 0.60" in text
    assert "hindsight/val_success" in text  # the metric used is named
    assert "median steps 25.0 (runs that did not reach it count at the budget); reached 1/2" in text
    assert "median steps 15.0; reached 2/2" in text  # no budget note when every seed reached it

    text, data = summarize(run_dir, threshold=0.8, budget=40)
    assert data["methods"]["grpo"]["median_steps"] == 30.0  # median(20, 40)
    assert data["hint_sd_over_grpo"] == pytest.approx(0.5)
    # grpo-s1 logged 30 steps of a 40-step budget without reaching 80%: cut short, named as such
    assert "cut@30" in text and ">40" not in text and "before the budget of 40" in text
    assert [r["cut"] for r in data["methods"]["grpo"]["runs"]] == [False, True]
    text, _ = summarize(run_dir, threshold=0.8, budget=30)
    assert ">30" in text and "cut@" not in text  # the whole budget ran

    _, data = summarize(run_dir, threshold=0.95, budget=40)
    assert data["methods"]["grpo"]["median_steps"] == 40  # nobody reaches 95%
    assert [r["steps_to_threshold"] for r in data["methods"]["hint_sd"]["runs"]] == [30, None]


def test_val_key_prefers_hindsight_val_success(tmp_path):
    d = tmp_path / "grpo-s0"
    d.mkdir()
    rows = [{"step": 0, "data": {"val-core/toy/reward/mean@1": 0.9, "hindsight/val_success": 0.1}},
            {"step": 5, "data": {"val-core/toy/reward/mean@1": 0.95, "hindsight/val_success": 0.85}}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, data = summarize(tmp_path)
    run = data["methods"]["grpo"]["runs"][0]
    assert run["val_key"] == "hindsight/val_success" and run["steps_to_threshold"] == 5


@pytest.fixture()
def figures(monkeypatch):
    """The figures saved during a test, to look at their curves."""
    import matplotlib.figure

    saved, original = [], matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return saved


def _legend(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_plot_is_a_png_with_mean_and_seed_curves(run_dir, figures):
    import matplotlib.image

    path = plot_run(run_dir)
    assert path == run_dir / "curves.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100

    val, gap, frac = figures[-1].axes
    assert _legend(val) == ["grpo (2 seeds)", "hint_sd (2 seeds)", "80%"]
    mean = next(line for line in val.get_lines() if line.get_label() == "grpo (2 seeds)")
    assert list(mean.get_xdata()) == [0, 10, 20, 30]
    assert list(mean.get_ydata()) == pytest.approx([0.0, 0.3, 0.55, 0.6])
    assert any(line.get_linestyle() == "--" and list(line.get_ydata()) == [0.8, 0.8] for line in val.get_lines())
    assert _legend(gap) == ["hint_sd (2 seeds)"]  # GRPO logs no gap: skipped in that panel
    assert _legend(frac) == ["hint_sd (2 seeds)"]


def test_mean_curve_holds_a_stopped_seed_at_its_last_success():
    from verl_hindsight.report.plots import _mean_curve

    stopped = ([0, 10, 20], [0.0, 0.5, 0.9])  # reached the target at step 20 and stopped
    stalled = ([0, 10, 20, 30], [0.0, 0.1, 0.2, 0.3])
    steps, means = _mean_curve([stopped, stalled], hold_last=True)
    assert steps == [0, 10, 20, 30] and means == pytest.approx([0.0, 0.3, 0.55, 0.6])
    steps, means = _mean_curve([stopped, stalled])  # other panels: only the seeds still training
    assert steps == [0, 10, 20, 30] and means == pytest.approx([0.0, 0.3, 0.55, 0.3])
    steps, _ = _mean_curve([([0, 10, 20], [0.0, 0.1, 0.2]), ([0, 20], [0.0, 0.4])])
    assert steps == [0, 20]  # step 10 is missing inside the second seed's range


def test_plot_ablation_writes_the_given_file(run_dir, figures):
    import matplotlib.image

    live = run_dir / "hint_sd_live-s0"
    live.mkdir()
    (live / "metrics.jsonl").write_text(_metrics("hint_sd_live", [0.0, 0.1, 0.1, 0.1]))
    path = plot_ablation(run_dir, {"frozen": "hint_sd", "live": "hint_sd_live-s0", "absent": "nope"},
                         "ablation_teacher.png", "teacher kind")
    assert path == run_dir / "ablation_teacher.png"
    assert path.read_bytes()[:8] == PNG_MAGIC and matplotlib.image.imread(path).shape[0] > 100
    assert len(figures[-1].axes) == 2
    assert _legend(figures[-1].axes[1]) == ["frozen (2 seeds)", "live"]

    # the main plot leaves the ablation out; the demo's ablation figures are written for the runs that exist
    plot_run(run_dir)
    assert "hint_sd_live" not in " ".join(_legend(figures[-1].axes[0]))
    assert [p.name for p in plot_ablations(run_dir)] == ["ablation_teacher.png"]


class _Checker(HTMLParser):
    """Tag balance (every non-void element closed in order) and every resource reference."""

    VOID = {"meta", "input", "img", "br", "hr", "link", "option"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.resources, self.titles = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if attrs.get(name):
                self.resources.append((tag, attrs[name]))
        if tag == "span" and attrs.get("title"):
            self.titles.append(attrs["title"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def _check(page):
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert all(src.startswith("data:") for _, src in checker.resources), checker.resources
    assert "http://" not in page and "https://" not in page and "<link" not in page and "@import" not in page
    assert "<script src" not in page
    return checker


def test_viewer_is_self_contained_and_escapes_text(run_dir):
    plot_run(run_dir)
    path = build_viewer(run_dir)
    assert path == run_dir / "viewer.html"
    page = path.read_text()
    checker = _check(page)
    assert html_escaped(FEEDBACK) in page and "wrong key: the blue door opens with D" in page
    assert "&lt;action&gt;A &amp; B" in page and TOKEN_TEXT not in page
    assert 'class="fb"' in page and "targeted turns: 0" in page and 'class="badge">targeted' in page
    tips = [t for t in checker.titles if "gap -2.000" in t]
    assert tips and "old_lp -1.000" in tips[0] and "teacher_lp -3.000" in tips[0] and "kl 5.390" in tips[0]
    assert "serl_weight 0.800" in page  # the SERL run's tooltips
    assert "colour: SERL weight" in page and "colour: per-token KL" in page
    assert "no per-token hindsight values" in page  # GRPO's dumps
    for label in ("grpo-s0", "grpo-s1", "hint_sd-s0", "hint_sd-s1", "serl-s0"):
        assert f'<option value="{label}">' in page
    assert "data:image/png;base64," in page  # curves.png embedded, not linked


def html_escaped(text):
    import html

    return html.escape(text)


def test_viewer_samples_first_and_last_steps(tmp_path):
    d = tmp_path / "hint_sd-s0" / "dump"
    d.mkdir(parents=True)
    for step in range(1, 11):
        (d / f"step_{step}.jsonl").write_text(_dump("hint_sd", step, 8))
    page = build_viewer(tmp_path, max_trajectories=16).read_text()
    _check(page)
    assert page.count('class="traj') == 16
    assert 'data-step="1"' in page and 'data-step="10"' in page


def test_viewer_reads_verl_rollout_dumps_only(tmp_path):
    (tmp_path / "rollouts").mkdir()
    rows = [{"input": "Q <b> & c", "output": "A & B </pre><script>x()</script>", "gts": None, "score": 1.0,
             "step": 3, "request_id": "r1"},
            {"input": "Q2", "output": "A2", "gts": "x", "score": 0.0, "step": 3}]
    (tmp_path / "rollouts" / "3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rollouts" / "notes.jsonl").write_text('{"other": 1}\nnot json\n')
    page = build_viewer(tmp_path).read_text()
    _check(page)
    assert "Q &lt;b&gt; &amp; c" in page and "A &amp; B &lt;/pre&gt;&lt;script&gt;x()&lt;/script&gt;" in page
    assert "score 1.000" in page and "score 0.000" in page and "request_id" in page
    assert page.count('class="traj') == 2
    assert 'class="tok' not in page  # no token colouring for verl's dumps


def test_viewer_with_no_dumps(tmp_path):
    page = build_viewer(tmp_path).read_text()
    _check(page)
    assert "No trajectory dumps found" in page


def test_summary_shows_invalid_actions_and_sign_flips_per_run(tmp_path):
    """Per run: the mean invalid-action rate over its steps, the steps above 0.25, and the share of targeted tokens
    whose advantage flipped sign, weighted by each step's targeted tokens; '-' where the run logs none."""
    rows = {
        "additive-s0": [{"hindsight/invalid_action_rate": 0.1, "serl/sign_flipped_frac": 0.5,
                         "serl/hindsight_tokens": 2},
                        {"hindsight/invalid_action_rate": 0.3, "serl/sign_flipped_frac": 0.0,
                         "serl/hindsight_tokens": 6},
                        {"hindsight/invalid_action_rate": 0.5, "serl/hindsight_tokens": 0,  # stage off: no tokens
                         "hindsight/val_success": 0.4}],
        "hint_sd-s0": [{"hindsight/invalid_action_rate": 0.0}, {"hindsight/invalid_action_rate": 0.26,
                                                                "hindsight/val_success": 0.9}],
        "grpo-s0": [{"hindsight/val_success": 0.1}],
    }
    for name, steps in rows.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i, "data": data}) + "\n" for i, data in enumerate(steps)))
    text, data = summarize(tmp_path, threshold=0.8, budget=200)
    additive = data["methods"]["additive"]["runs"][0]
    assert additive["invalid_action_rate"] == pytest.approx((0.1 + 0.3 + 0.5) / 3)
    assert additive["invalid_steps"] == 2  # 0.3 and 0.5 are above 0.25
    assert additive["sign_flipped_frac"] == pytest.approx((0.5 * 2 + 0.0 * 6) / 8)  # 1 flipped token of 8
    hint = data["methods"]["hint_sd"]["runs"][0]
    assert hint["invalid_action_rate"] == pytest.approx(0.13) and hint["invalid_steps"] == 1
    assert hint["sign_flipped_frac"] is None  # no SERL step
    grpo = data["methods"]["grpo"]["runs"][0]
    assert grpo["invalid_action_rate"] is None and grpo["invalid_steps"] is None
    lines = text.splitlines()
    assert lines[2].split() == ["method", "seed", "final", "best", "steps", "to", "80%", "invalid", ">0.25", "flipped"]
    assert next(line for line in lines if line.startswith("additive")).split() == [  # ended at step 2 of 200
        "additive", "0", "0.40", "0.40", "cut@2", "0.30", "2", "0.125"]
    assert next(line for line in lines if line.startswith("hint_sd")).split() == [
        "hint_sd", "0", "0.90", "0.90", "1", "0.13", "1", "-"]
    assert next(line for line in lines if line.startswith("grpo")).split()[-3:] == ["-", "-", "-"]


def test_comparison_figures_are_written_for_the_runs_that_exist(run_dir, figures):
    for name, vals in (("rlsd-s0", [0.0, 0.2, 0.5, 0.9]), ("hint_sd_nofb-s0", [0.0, 0.1, 0.1, 0.2])):
        (run_dir / name).mkdir()
        (run_dir / name / "metrics.jsonl").write_text(_metrics(name, vals))
    written = [p.name for p in plot_ablations(run_dir)]
    assert written == ["credit_rules.png", "no_feedback.png"]  # no SERL ablation or teacher-kind run here
    no_feedback = figures[-1]
    assert _legend(no_feedback.axes[0]) == ["HINT-SD (2 seeds)", "HINT-SD, no feedback", "RLSD", "80%"]
    assert _legend(figures[-2].axes[0]) == ["GRPO (2 seeds)", "RLSD unclipped", "HINT-SD (2 seeds)", "80%"]
    # the main figure keeps to the main methods
    plot_run(run_dir)
    assert _legend(figures[-1].axes[0]) == ["grpo (2 seeds)", "hint_sd (2 seeds)", "80%"]
