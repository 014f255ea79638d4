"""``viewer.html``: a self-contained trajectory viewer (inline CSS/JS, no network) for a run folder.

Reads, anywhere under the folder:
- the hindsight trainer's dumps (``hindsight.dump_dir``, :mod:`verl_hindsight.trainer.dump`): each turn's observation,
  the feedback inserted for the teacher, which turns were targeted, and the response tokens coloured by SERL weight
  (SERL runs) or per-token KL (distillation runs), action tokens outlined, values in each token's tooltip;
- verl's own rollout dumps (``trainer.rollout_data_dir``: ``<step>.jsonl`` lines with input/output/score), shown as
  plain samples, so the viewer is useful on GPU runs too.
All text is HTML-escaped: model output routinely contains ``<`` and ``&``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Optional

STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px} h2{font-size:16px;margin:18px 0 6px} .meta{color:#555;font-size:13px}
details{border:1px solid #ddd;border-radius:6px;margin:6px 0;padding:6px 10px}
summary{cursor:pointer} .ok{color:#176b2c} .bad{color:#a31515}
.turn{margin:6px 0 6px 10px;font-size:13px} .obs{color:#333} .fb{background:#fff3c4;padding:2px 4px}
.targeted{font-weight:bold;color:#7a3e00}
.tokens{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;line-height:1.9;margin-top:6px}
.tok{border-radius:3px;padding:1px 0} .act{outline:1px solid #444} .tgt{text-decoration:underline double}
.legend{font-size:12px;color:#555} pre{white-space:pre-wrap;font-size:12px;background:#f6f6f6;padding:6px}
#filter{margin:6px 0;padding:4px;width:320px}
"""

SCRIPT = """
function applyFilter(){
  var q=document.getElementById('filter').value.toLowerCase();
  var items=document.querySelectorAll('details.traj');
  for(var i=0;i<items.length;i++){
    var t=items[i].getAttribute('data-search')||'';
    items[i].style.display=(q===''||t.indexOf(q)>=0)?'':'none';
  }
}
document.addEventListener('DOMContentLoaded',function(){
  document.getElementById('filter').addEventListener('input',applyFilter);
});
"""


def _colour(value: Optional[float], kind: str) -> str:
    """Background for a token: SERL weight around 1 (blue < 1 < red), or KL >= 0 (white -> red)."""
    if value is None:
        return "transparent"
    if kind == "weight":
        delta = max(-1.0, min(1.0, (value - 1.0) / 0.2))
        if delta >= 0:
            return f"rgba(220,60,40,{0.15 + 0.6 * delta:.2f})"
        return f"rgba(40,90,220,{0.15 + 0.6 * -delta:.2f})"
    strength = max(0.0, min(1.0, value / 3.0))
    return f"rgba(220,60,40,{0.1 + 0.7 * strength:.2f})"


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _hindsight_record(rec: dict, run: str) -> str:
    e = html.escape
    tokens = rec.get("tokens") or []
    kind = "weight" if any(t.get("serl_weight") is not None for t in tokens) else "kl"
    spans = []
    for t in tokens:
        value = t.get("serl_weight") if kind == "weight" else t.get("kl")
        classes = "tok" + (" act" if t.get("action") else "") + (" tgt" if t.get("targeted") else "")
        tip = (f"old_lp {_fmt(t.get('old_lp'))} | teacher_lp {_fmt(t.get('teacher_lp'))} | gap {_fmt(t.get('gap'))}"
               f" | serl_weight {_fmt(t.get('serl_weight'))} | kl {_fmt(t.get('kl'))} | adv {_fmt(t.get('advantage'))}")
        spans.append(f'<span class="{classes}" style="background:{_colour(value, kind)}" title="{e(tip)}">'
                     f'{e(t.get("text", ""))}</span>')
    turns = []
    for t in rec.get("turns") or []:
        mark = ' <span class="targeted">[targeted]</span>' if t.get("targeted") else ""
        feedback = (f'<div>feedback inserted for the teacher: <span class="fb">{e(t["feedback"])}</span></div>'
                    if t.get("feedback") else "")
        error = f'<div class="bad">environment: {e(str(t["error"]))}</div>' if t.get("error") else ""
        turns.append(f'<div class="turn"><b>turn {t.get("turn")}</b>{mark}<div class="obs">observation: '
                     f'{e(str(t.get("observation", "")))}</div><div>action: {e(str(t.get("action")))}</div>'
                     f'{error}{feedback}</div>')
    status = '<span class="ok">success</span>' if rec.get("success") else '<span class="bad">failed</span>'
    search = " ".join([run, str(rec.get("task_id", "")), str(rec.get("step", ""))] +
                      [str(t.get("feedback") or "") for t in rec.get("turns") or []]).lower()
    legend = ("colour: SERL weight (red > 1, blue < 1)" if kind == "weight" else "colour: per-token KL(student||teacher)")
    return (f'<details class="traj" data-search="{e(search)}"><summary>{e(run)} · step {e(str(rec.get("step")))} · '
            f'task {e(str(rec.get("task_id", "")))} · {status} · return {_fmt(rec.get("return"))}</summary>'
            f'{"".join(turns)}<div class="legend">{legend}; outlined = action tokens; underlined = targeted</div>'
            f'<div class="tokens">{"".join(spans)}</div></details>')


def _verl_record(rec: dict, run: str) -> str:
    e = html.escape
    search = f"{run} {rec.get('step', '')} {rec.get('input', '')[:200]}".lower()
    return (f'<details class="traj" data-search="{e(search)}"><summary>{e(run)} · step {e(str(rec.get("step")))} · '
            f'score {_fmt(rec.get("score"))}</summary><div>input</div><pre>{e(str(rec.get("input", "")))}</pre>'
            f'<div>output</div><pre>{e(str(rec.get("output", "")))}</pre></details>')


def collect(run_dir: Path, max_trajectories: int) -> list[tuple[str, str, dict]]:
    """(kind, run label, record) for the dumps under ``run_dir``, latest steps first, at most N per run."""
    found: dict[str, list[tuple[int, str, dict]]] = {}
    for path in sorted(Path(run_dir).rglob("*.jsonl")):
        if path.name == "metrics.jsonl":
            continue
        label = str(path.parent.relative_to(run_dir)).replace("/dump", "")
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict):
                continue
            if "tokens" in rec and "turns" in rec:
                kind = "hindsight"
            elif "input" in rec and "output" in rec:
                kind = "verl"
            else:
                continue
            found.setdefault(label, []).append((int(rec.get("step", 0) or 0), kind, rec))
    out = []
    for label, items in sorted(found.items()):
        items.sort(key=lambda x: -x[0])
        out += [(kind, label, rec) for _, kind, rec in items[:max_trajectories]]
    return out


def build_viewer(run_dir: Path, out: Optional[Path] = None, max_trajectories: int = 40) -> Path:
    run_dir = Path(run_dir)
    out = Path(out or run_dir / "viewer.html")
    records = collect(run_dir, max_trajectories)
    sections: dict[str, list[str]] = {}
    for kind, label, rec in records:
        render = _hindsight_record if kind == "hindsight" else _verl_record
        sections.setdefault(label, []).append(render(rec, label))
    body = "".join(f"<h2>{html.escape(label)}</h2>{''.join(items)}" for label, items in sections.items())
    if not body:
        body = "<p>No trajectory dumps found (hindsight.dump_dir or trainer.rollout_data_dir).</p>"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>verl-hindsight trajectories</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body><h1>Trajectories: "
            f"{html.escape(run_dir.name)}</h1><div class='meta'>{len(records)} trajectories · latest steps first</div>"
            f"<input id='filter' placeholder='filter: run, task id, feedback text'>{body}</body></html>")
    out.write_text(page)
    return out
