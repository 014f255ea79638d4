"""The trajectory viewer in a real headless browser (Debian's chromium, installed by `.ci/run` with apt).

Console errors are caught two ways, and both are shown to catch a deliberately broken page:
1. chromium's own log (``--enable-logging=stderr --v=0``): every message the page writes to the console, whatever
   its level, is logged as an ``INFO:CONSOLE`` line, uncaught exceptions as ``"Uncaught ..."``; the viewer writes
   nothing to the console, so any such line fails the test;
2. a probe: a copy of the page with a first script that records ``error`` events (uncaught exceptions and failed
   resource loads), unhandled rejections and ``console.error``/``console.warn`` calls on ``<html data-errors>``,
   then, on ``load``, drives the viewer's step selector; ``--dump-dom`` returns the DOM after load.
"""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from verl_hindsight.report.viewer import build_viewer

pytestmark = pytest.mark.e2e

FEEDBACK = "wrong key: the blue door opens with D"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]

PROBE = """<script>
(function(){
  var errs=[], root=document.documentElement;
  function rec(m){ errs.push(String(m)); root.setAttribute('data-errors', JSON.stringify(errs)); }
  root.setAttribute('data-errors', '[]');
  window.addEventListener('error', function(e){ rec('error: '+(e.message||(e.target&&e.target.outerHTML)||e.type)); },
                          true);
  window.addEventListener('unhandledrejection', function(e){ rec('unhandled rejection: '+e.reason); });
  ['error','warn'].forEach(function(level){
    var orig=console[level];
    console[level]=function(){
      rec('console.'+level+': '+Array.prototype.join.call(arguments,' '));
      orig.apply(console, arguments);
    };
  });
  window.addEventListener('load', function(){
    var before=document.getElementById('count'), sel=document.getElementById('sel-step');
    var probe={loaded:true, count_before: before ? before.textContent : null};
    if(sel && sel.options.length > 1){
      sel.value=sel.options[sel.options.length-1].value;
      sel.dispatchEvent(new Event('change'));
      probe.step=sel.value;
      probe.count_after=document.getElementById('count').textContent;
      var shown=0, items=document.querySelectorAll('details.traj');
      for(var i=0;i<items.length;i++){ if(items[i].style.display!=='none'){ shown++; } }
      probe.visible=shown;
    }
    root.setAttribute('data-probe', JSON.stringify(probe));
  });
})();
</script>"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is missing: `.ci/run` (the project's test entry point) installs Debian's chromium with "
                    "`apt-get install -y chromium`; install it the same way to run this test")
    return path


def _console_errors(stderr: str) -> list[str]:
    """Lines where the page wrote to the console or threw (chromium logs page console output as INFO:CONSOLE)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _screenshot(page: Path, shot: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    proc = subprocess.run([_chromium(), *FLAGS, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    return proc, _console_errors(proc.stderr)


class _Root(HTMLParser):
    def __init__(self):
        super().__init__()
        self.attrs = None

    def handle_starttag(self, tag, attrs):
        if tag == "html" and self.attrs is None:
            self.attrs = dict(attrs)


def _probe(page: Path) -> tuple[dict, list[str], str, list[str]]:
    """(probe results, errors the page recorded, DOM after load, console lines) for a probed copy of ``page``."""
    text = page.read_text()
    probed = page.with_name(page.stem + ".probe.html")
    head = text.find("<head>")
    probed.write_text(text[:head + 6] + PROBE + text[head + 6:] if head >= 0 else PROBE + text)
    proc = subprocess.run([_chromium(), *FLAGS, "--dump-dom", probed.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    root = _Root()
    root.feed(proc.stdout)
    attrs = root.attrs or {}
    recorded = json.loads(attrs.get("data-errors") or '["the probe did not run"]')
    return json.loads(attrs.get("data-probe") or "{}"), recorded, proc.stdout, _console_errors(proc.stderr)


def test_broken_page_is_detected(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head></head><body><script>undefinedFunction();</script>"
                    "<script>console.error('boom');</script><p>x</p></body></html>")
    _, errors = _screenshot(page, tmp_path / "broken.png")
    assert any("Uncaught ReferenceError" in e for e in errors), "the chromium-log check misses an uncaught exception"
    assert any('"boom"' in e for e in errors), "the chromium-log check misses console.error"
    _, recorded, _, _ = _probe(page)
    assert any("undefinedFunction" in e for e in recorded), recorded
    assert "console.error: boom" in recorded, recorded


def _hindsight_rec(step, i, serl):
    tokens = [{"text": t, "action": int(t == "C"), "targeted": int(t == "C"), "advantage": 0.2, "old_lp": -1.0,
               "teacher_lp": -3.0 if t == "C" else None, "gap": -2.0 if t == "C" else None,
               "serl_weight": (0.7 + 0.1 * i) if (serl and t == "C") else None,
               "kl": 5.4 if t == "C" else None} for t in ("<action>", "C", "</action>", " & done")]
    return {"step": step, "experiment": "toy", "uid": f"u{step}-{i}", "task_id": f"blue-red-{i}", "env": "toy",
            "success": i % 2 == 0, "return": 0.5 * (i % 2), "failure": None, "prompt": "<|im_start|>user\nDoor 1",
            "turns": [{"turn": 0, "observation": "Door 1 of 2 is blue.", "action": "C", "error": "wrong key",
                       "next_observation": "Key C does not open door 1.", "targeted": True, "feedback": FEEDBACK},
                      {"turn": 1, "observation": "Door 2 of 2 is red.", "action": "F", "error": None,
                       "next_observation": "", "targeted": False, "feedback": None}],
            "tokens": tokens}


@pytest.fixture()
def viewer(tmp_path):
    run = tmp_path / "run"
    for name, serl in (("hint_sd-s0", False), ("serl-s0", True)):
        dump = run / name / "dump"
        dump.mkdir(parents=True)
        for step in (1, 5):
            (dump / f"step_{step}.jsonl").write_text(
                "".join(json.dumps(_hindsight_rec(step, i, serl)) + "\n" for i in range(4)))
    rollouts = run / "gpu_rollouts"  # verl's own rollout dump next to them
    rollouts.mkdir()
    (rollouts / "7.jsonl").write_text(json.dumps({"input": "Q <b> & c", "output": "A </pre> & B", "gts": None,
                                                  "score": 1.0, "step": 7}) + "\n")
    return build_viewer(run)


def test_viewer_renders_without_console_errors(viewer, tmp_path):
    shot = tmp_path / "viewer.png"
    proc, errors = _screenshot(viewer, shot)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not errors, errors
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, len(data)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.reshape(-1, pixels.shape[-1]).std(axis=0).max() > 0.01  # not a single colour


def test_viewer_script_runs_and_text_stays_text(viewer):
    probe, recorded, dom, console = _probe(viewer)
    assert recorded == [] and console == [], (recorded, console)
    assert probe.get("loaded") and probe["count_before"] == "17 shown", probe  # the viewer's script ran on load
    assert probe["step"] == "7" and probe["count_after"] == "1 shown" and probe["visible"] == 1, probe
    assert f'<span class="fb">{FEEDBACK}</span>' in dom
    assert "&lt;action&gt;" in dom and "<action>" not in dom  # model text was not parsed as markup
    assert "A &lt;/pre&gt; &amp; B" in dom
