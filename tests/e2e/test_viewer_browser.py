"""The viewer in a real headless browser (Debian's chromium, installed by `.ci/run`): it renders, and the page logs
no console errors — checked against a deliberately broken page so the check itself is known to work."""

import json
import shutil
import subprocess

import pytest

from verl_hindsight.report.viewer import build_viewer

pytestmark = pytest.mark.e2e


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is missing: `.ci/run` (the README's test command) installs it with "
                    "`apt-get install -y chromium`")
    return path


def _render(page, shot):
    proc = subprocess.run([_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", f"--screenshot={shot}", "--window-size=1280,1600", f"file://{page}"],
                          capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines()
              if "CONSOLE" in line and ("Uncaught" in line or "ERROR" in line.upper().split("CONSOLE")[0])]
    errors += [line for line in proc.stderr.splitlines() if "Uncaught" in line]
    return proc, errors


def test_broken_page_is_detected(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>undefinedFunction();</script>x</body></html>")
    _, errors = _render(page, tmp_path / "broken.png")
    assert errors, "the console-error check does not see an uncaught exception"


def test_viewer_renders_without_console_errors(tmp_path):
    run = tmp_path / "hint_sd-s0" / "dump"
    run.mkdir(parents=True)
    tokens = [{"text": t, "action": int(t == "C"), "targeted": int(t == "C"), "advantage": 0.2, "old_lp": -1.0,
               "teacher_lp": -3.0 if t == "C" else None, "gap": -2.0 if t == "C" else None, "serl_weight": None,
               "kl": 5.4 if t == "C" else None} for t in ("<", "action", ">", "C", "</", "action", ">")]
    rec = {"step": 1, "experiment": "toy_hint_sd", "uid": "u", "task_id": "blue-red", "env": "toy", "success": False,
           "return": 0.0, "failure": None, "prompt": "p",
           "turns": [{"turn": 0, "observation": "Door 1 of 2 is blue.", "action": "C", "error": "wrong key",
                      "next_observation": "", "targeted": True,
                      "feedback": "wrong key: the blue door opens with D"}], "tokens": tokens}
    (run / "step_1.jsonl").write_text("\n".join(json.dumps(rec) for _ in range(5)) + "\n")
    page = build_viewer(tmp_path)
    shot = tmp_path / "viewer.png"
    proc, errors = _render(page, shot)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not errors, errors
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.reshape(-1, pixels.shape[-1]).std(axis=0).max() > 0.01  # not a blank page
