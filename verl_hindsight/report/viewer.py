"""``viewer.html``: a self-contained trajectory viewer (inline CSS/JS, no network, no external fonts) for a run folder.

Reads every ``*.jsonl`` under the folder (recursively; ``metrics.jsonl`` excepted) and tells the formats apart by
their keys:
- the hindsight trainer's dumps (``hindsight.dump_dir``, :mod:`verl_hindsight.trainer.dump`; lines with ``turns`` and
  ``tokens``): task id, success, return, each turn's observation / action / environment error, the feedback inserted
  for the teacher (highlighted), which turns were targeted, and the response tokens coloured by SERL weight (SERL runs)
  or per-token KL (HINT-SD / HERO), action tokens outlined, targeted tokens double-underlined, and old_lp /
  teacher_lp / gap / weight / kl / advantage in each token's tooltip;
- verl's own rollout dumps (``trainer.rollout_data_dir``: ``<step>.jsonl`` lines with ``input``/``output``/``score``),
  shown as plain samples (no token colouring), so the viewer works on GPU runs too.
Trajectories are sampled over the dumped steps (last and first step always, evenly spaced ones in between), at most
``max_trajectories`` per run. All text is HTML-escaped: model output routinely contains ``<`` and ``&``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Union

ROWS_PER_STEP = 8
STEP_FILE = re.compile(r"^(?:step_)?(\d+)\.jsonl$")

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:4px 0} h2{font-size:16px;margin:18px 0 6px;border-bottom:1px solid #ccc}
.meta,.legend{color:#555;font-size:12px}
.bar{position:sticky;top:0;background:#f4f4f4;border:1px solid #ddd;border-radius:6px;padding:6px 8px;z-index:2}
.bar label{font-size:13px;margin-right:10px} .bar select,.bar input,.bar button{font-size:13px;padding:2px 4px}
#filter{width:260px}
details{border:1px solid #ddd;border-radius:6px;margin:6px 0;padding:6px 10px}
details.traj>summary{cursor:pointer;font-size:14px}
.ok{color:#176b2c;font-weight:bold} .bad{color:#a31515;font-weight:bold}
.turn{margin:6px 0 6px 4px;padding:4px 8px;font-size:13px;border-left:3px solid #ccc}
.turn.tgt-turn{border-left-color:#d9822b;background:#fffaf0}
.lbl{color:#666;display:inline-block;min-width:130px}
.fb{background:#ffe680;padding:1px 4px;border-radius:3px;font-weight:bold}
.badge{background:#d9822b;color:#fff;border-radius:3px;padding:0 5px;font-size:11px;margin-left:6px}
.tokens{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;white-space:pre-wrap;line-height:2;
 margin-top:6px;border:1px solid #eee;padding:4px}
.tok{border-radius:2px;padding:1px 0} .act{outline:1px solid #333} .tgt{text-decoration:underline double #a31515}
.flip{font-weight:bold;text-decoration:underline wavy #5a1ea3}
pre{white-space:pre-wrap;word-break:break-word;font-size:12px;background:#f6f6f6;padding:6px;margin:2px 0}
.swatch{display:inline-block;width:14px;height:12px;vertical-align:middle;border:1px solid #ccc}
img.curves{max-width:100%}
"""

SCRIPT = """
(function(){
  function apply(){
    var run=document.getElementById('sel-run').value;
    var step=document.getElementById('sel-step').value;
    var q=document.getElementById('filter').value.toLowerCase();
    var items=document.querySelectorAll('details.traj');
    var shown=0;
    for(var i=0;i<items.length;i++){
      var el=items[i];
      var ok=(run===''||el.getAttribute('data-run')===run)&&(step===''||el.getAttribute('data-step')===step)&&
             (q===''||(el.getAttribute('data-search')||'').indexOf(q)>=0);
      el.style.display=ok?'':'none';
      if(ok){shown++;}
    }
    var secs=document.querySelectorAll('section.run');
    for(var j=0;j<secs.length;j++){
      var vis=secs[j].querySelectorAll('details.traj:not([style*="none"])').length>0;
      secs[j].style.display=vis?'':'none';
    }
    document.getElementById('count').textContent=shown+' shown';
  }
  function setOpen(v){
    var items=document.querySelectorAll('details.traj');
    for(var i=0;i<items.length;i++){ if(items[i].style.display!=='none'){items[i].open=v;} }
  }
  function init(){
    document.getElementById('sel-run').addEventListener('change',apply);
    document.getElementById('sel-step').addEventListener('change',apply);
    document.getElementById('filter').addEventListener('input',apply);
    document.getElementById('expand').addEventListener('click',function(){setOpen(true);});
    document.getElementById('collapse').addEventListener('click',function(){setOpen(false);});
    apply();
  }
  if(document.readyState==='loading'){document.addEventListener('DOMContentLoaded',init);}else{init();}
})();
"""


def _num(x: Any) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def _colour(value: Any, kind: str) -> str:
    """Background for a token: SERL weight around 1 (blue < 1 < red), or KL >= 0 (white -> red)."""
    v = _num(value)
    if v is None:
        return "transparent"
    if kind == "weight":
        delta = max(-1.0, min(1.0, (v - 1.0) / 0.5))
        if delta >= 0:
            return f"rgba(220,60,40,{0.12 + 0.6 * delta:.2f})"
        return f"rgba(40,90,220,{0.12 + 0.6 * -delta:.2f})"
    strength = max(0.0, min(1.0, v / 2.0))
    return f"rgba(220,60,40,{0.08 + 0.72 * strength:.2f})"


def _legend(kind: str) -> str:
    if kind == "weight":
        scale = "".join(f'<span class="swatch" style="background:{_colour(w, "weight")}"></span>'
                        for w in (0.5, 0.75, 1.0, 1.25, 1.5))
        text = ("colour: SERL weight on the advantage (blue &lt; 1 &lt; red; 0.5 … 1.5; none where the outcome's "
                "advantage is 0) · bold wavy = the credit rule flipped the token's sign")
    else:
        scale = "".join(f'<span class="swatch" style="background:{_colour(k, "kl")}"></span>'
                        for k in (0.0, 0.5, 1.0, 1.5, 2.0))
        text = "colour: per-token KL(student‖teacher), k3 estimate (0 … ≥2)"
    return (f'<div class="legend">{text} {scale} · outlined = action tokens · double underline = targeted tokens '
            f'· hover a token for old_lp / teacher_lp / gap / weight / kl</div>')


def _hindsight_record(rec: dict, run: str, kind: str) -> str:
    e = html.escape
    spans = []
    for t in rec.get("tokens") or []:
        if not isinstance(t, dict):
            continue
        value = t.get("serl_weight") if kind == "weight" else t.get("kl")
        classes = ("tok" + (" act" if t.get("action") else "") + (" tgt" if t.get("targeted") else "")
                   + (" flip" if t.get("flipped") else ""))
        tip = (f"old_lp {_fmt(t.get('old_lp'))} | teacher_lp {_fmt(t.get('teacher_lp'))} | gap {_fmt(t.get('gap'))}"
               f" | serl_weight {_fmt(t.get('serl_weight'))} | kl {_fmt(t.get('kl'))}"
               f" | advantage {_fmt(t.get('advantage'))}"
               + (f" (outcome's {_fmt(t.get('base_advantage'))})" if t.get("base_advantage") is not None else ""))
        spans.append(f'<span class="{classes}" style="background:{_colour(value, kind)}" title="{e(tip)}">'
                     f'{e(str(t.get("text", "")))}</span>')
    turns, targeted = [], []
    for t in rec.get("turns") or []:
        if not isinstance(t, dict):
            continue
        if t.get("targeted"):
            targeted.append(str(t.get("turn")))
        rows = [f'<div><span class="lbl">observation</span>{e(str(t.get("observation") or ""))}</div>',
                f'<div><span class="lbl">action</span>{e(_fmt(t.get("action")))}</div>']
        if t.get("error"):
            rows.append(f'<div><span class="lbl">env error</span><span class="bad">{e(str(t["error"]))}</span></div>')
        if t.get("feedback"):
            rows.append(f'<div><span class="lbl">feedback inserted</span><span class="fb">{e(str(t["feedback"]))}'
                        f'</span></div>')
        if t.get("next_observation"):
            rows.append(f'<div><span class="lbl">next observation</span>{e(str(t["next_observation"]))}</div>')
        badge = '<span class="badge">targeted</span>' if t.get("targeted") else ""
        turns.append(f'<div class="turn{" tgt-turn" if t.get("targeted") else ""}"><b>turn {e(str(t.get("turn")))}'
                     f'</b>{badge}{"".join(rows)}</div>')
    status = '<span class="ok">success</span>' if rec.get("success") else '<span class="bad">failed</span>'
    failure = f' · failure {e(str(rec["failure"]))}' if rec.get("failure") else ""
    step = str(rec.get("step", ""))
    search = " ".join([run, str(rec.get("task_id", "")), step, str(rec.get("uid", ""))] +
                      [str(t.get("feedback") or "") for t in rec.get("turns") or [] if isinstance(t, dict)]).lower()
    prompt = (f'<details><summary class="meta">prompt</summary><pre>{e(str(rec["prompt"]))}</pre></details>'
              if rec.get("prompt") else "")
    return (f'<details class="traj" data-run="{e(run)}" data-step="{e(step)}" data-search="{e(search)}">'
            f'<summary>step {e(step)} · task <b>{e(str(rec.get("task_id", "")))}</b> · {status} · return '
            f'{e(_fmt(_num(rec.get("return"))))} · {len(turns)} turns · targeted turns: '
            f'{e(", ".join(targeted) or "none")}{failure}</summary>{prompt}{"".join(turns)}'
            f'<div class="tokens">{"".join(spans)}</div></details>')


def _verl_record(rec: dict, run: str) -> str:
    e = html.escape
    step = str(rec.get("step", ""))
    extra = {k: v for k, v in rec.items() if k not in ("input", "output", "score", "step")}
    extra_rows = "".join(f'<div><span class="lbl">{e(str(k))}</span>{e(json.dumps(v, default=str)[:500])}</div>'
                         for k, v in extra.items())
    search = f"{run} {step} {str(rec.get('input', ''))[-300:]}".lower()
    score = _num(rec.get("score"))
    return (f'<details class="traj" data-run="{e(run)}" data-step="{e(step)}" data-search="{e(search)}">'
            f'<summary>step {e(step)} · score {e(_fmt(score if score is not None else rec.get("score")))}</summary>'
            f'<div class="lbl">input</div><pre>{e(str(rec.get("input", "")))}</pre>'
            f'<div class="lbl">output</div><pre>{e(str(rec.get("output", "")))}</pre>'
            f'<div class="meta">{extra_rows}</div></details>')


def _kind_of(rec: Any) -> Optional[str]:
    if not isinstance(rec, dict):
        return None
    if "turns" in rec and "tokens" in rec:
        return "hindsight"
    if "input" in rec and "output" in rec:
        return "verl"
    return None


def _records(path: Path, limit: int) -> Iterator[tuple[str, dict]]:
    n = 0
    with open(path, errors="replace") as f:
        for line in f:
            if n >= limit:
                return
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = _kind_of(rec)
            if kind:
                n += 1
                yield kind, rec


def _spread(n: int) -> list[int]:
    """Indices 0..n-1 in the order to sample them: last, first, then ever finer midpoints."""
    if n <= 0:
        return []
    order, seen = [n - 1, 0], set()
    parts = [(0, n - 1)]
    while parts:
        lo, hi = parts.pop(0)
        if hi - lo > 1:
            mid = (lo + hi) // 2
            order.append(mid)
            parts += [(mid, hi), (lo, mid)]
    return [i for i in order if not (i in seen or seen.add(i))]


def _label(run_dir: Path, path: Path) -> str:
    rel = path.parent.relative_to(run_dir)
    parts = list(rel.parts)
    if parts and parts[-1] in ("dump", "dumps", "rollouts", "rollout_data"):
        parts = parts[:-1]
    return "/".join(parts) or run_dir.name


def collect(run_dir: Path, max_trajectories: int) -> list[tuple[str, str, dict]]:
    """(format, run label, record) for the dumps under ``run_dir``: per run, at most ``max_trajectories`` records
    from evenly spread steps (the last and the first always), ``ROWS_PER_STEP`` per step at most, by step."""
    files: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(Path(run_dir).rglob("*.jsonl")):
        if path.name == "metrics.jsonl" or not path.is_file():
            continue
        m = STEP_FILE.match(path.name)
        files.setdefault(_label(run_dir, path), []).append((int(m.group(1)) if m else -1, path))
    out = []
    for label, paths in sorted(files.items()):
        paths.sort(key=lambda x: (x[0], str(x[1])))
        per_step = max(1, min(ROWS_PER_STEP, max_trajectories)) if len(paths) > 1 else max_trajectories
        picked: list[tuple[int, int, str, dict]] = []
        for i in _spread(len(paths)):
            if len(picked) >= max_trajectories:
                break
            step, path = paths[i]
            room = min(per_step, max_trajectories - len(picked))
            for j, (kind, rec) in enumerate(_records(path, room)):
                rec_step = rec.get("step")
                picked.append((rec_step if isinstance(rec_step, int) else step, j, kind, rec))
        picked.sort(key=lambda x: (x[0], x[1]))
        out += [(kind, label, rec) for _, _, kind, rec in picked]
    return out


def _curves(run_dir: Path) -> str:
    png = run_dir / "curves.png"
    if not png.is_file():
        return ""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f'<details><summary>training curves (curves.png)</summary><img class="curves" alt="curves" '
            f'src="data:image/png;base64,{data}"></details>')


def build_viewer(run_dir: Union[str, Path], out: Optional[Union[str, Path]] = None,
                 max_trajectories: int = 40) -> Path:
    """Write the viewer (default ``RUN_DIR/viewer.html``) and return its path."""
    e = html.escape
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "viewer.html"
    records = collect(run_dir, max_trajectories)
    by_run: dict[str, list[tuple[str, dict]]] = {}
    for kind, label, rec in records:
        by_run.setdefault(label, []).append((kind, rec))
    sections, steps = [], set()
    for label, items in by_run.items():
        hs = [rec for kind, rec in items if kind == "hindsight"]
        serl = "serl" in label.lower() or any("serl" in str(r.get("experiment", "")).lower() for r in hs) or any(
            isinstance(t, dict) and t.get("serl_weight") is not None for r in hs for t in r.get("tokens") or [])
        colour_kind = "weight" if serl else "kl"
        body = []
        for kind, rec in items:
            steps.add(str(rec.get("step", "")))
            body.append(_hindsight_record(rec, label, colour_kind) if kind == "hindsight" else _verl_record(rec, label))
        # the latest trajectory of each run starts expanded, so the page shows tokens without a click
        body[-1] = body[-1].replace('<details class="traj"', '<details class="traj" open', 1)
        valued = any(isinstance(t, dict) and (t.get("kl") is not None or t.get("serl_weight") is not None)
                     for r in hs for t in r.get("tokens") or [])
        if not hs:
            legend = '<div class="legend">verl rollout dump: input / output / score per sample</div>'
        elif not valued:
            legend = ('<div class="legend">no per-token hindsight values in these dumps (e.g. GRPO): tokens are '
                      'uncoloured · outlined = action tokens</div>')
        else:
            legend = _legend(colour_kind)
        sections.append(f'<section class="run"><h2>{e(label)}</h2>{legend}{"".join(body)}</section>')
    if not sections:
        sections.append("<p>No trajectory dumps found under this folder (hindsight.dump_dir or "
                        "trainer.rollout_data_dir).</p>")
    run_opts = "".join(f'<option value="{e(label)}">{e(label)}</option>' for label in by_run)
    step_opts = "".join(f'<option value="{e(s)}">{e(s)}</option>'
                        for s in sorted(steps, key=lambda s: (not s.lstrip("-").isdigit(), int(s) if
                                                              s.lstrip("-").isdigit() else 0, s)))
    bar = (f'<div class="bar"><label>run <select id="sel-run"><option value="">all</option>{run_opts}</select>'
           f'</label><label>step <select id="sel-step"><option value="">all</option>{step_opts}</select></label>'
           f'<label>filter <input id="filter" placeholder="task id, feedback text, uid"></label>'
           f'<button id="expand" type="button">expand all</button> <button id="collapse" type="button">collapse all'
           f'</button> <span class="meta" id="count"></span></div>')
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>verl-hindsight trajectories: '
            f'{e(run_dir.name)}</title><style>{STYLE}</style></head><body><h1>Trajectories: {e(run_dir.name)}</h1>'
            f'<div class="meta">{len(records)} trajectories from {len(by_run)} run(s); sampled over the dumped '
            f'steps (first and last always)</div>{_curves(run_dir)}{bar}{"".join(sections)}'
            f'<script>{SCRIPT}</script></body></html>')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
