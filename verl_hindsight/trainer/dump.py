"""Per-step trajectory dumps with per-token hindsight values: what the trajectory viewer shows.

``hindsight.dump_dir=DIR`` makes the hindsight trainer write ``DIR/step_<k>.jsonl`` every step, one JSON object per
sampled trajectory (the first ``hindsight.dump_rows`` non-padding rows), written after the advantage so SERL's
weights are final::

    {"step": 3, "experiment": "toy_serl", "uid": "...", "task_id": "red-blue-...", "env": "toy",
     "success": false, "return": 0.5, "prompt": "<decoded prompt>",
     "turns": [{"turn": 0, "observation": "...", "action": "C", "error": "wrong key: ...",
                "targeted": true, "feedback": "<text the teacher saw, or null>"}],
     "tokens": [{"text": "<", "action": 1, "targeted": 0, "advantage": 0.41, "old_lp": -1.2,
                 "teacher_lp": null, "gap": null, "serl_weight": null, "kl": null}, ...]}

``teacher_lp``/``gap``/``kl`` (the k3 reverse-KL estimate) are set on targeted tokens (with a top-k teacher, on
those whose token is among the teacher's k); ``serl_weight`` on targeted tokens when the estimator is SERL (the factor (1 - l) + l * w applied to the advantage).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional


def token_records(tokenizer, response_ids, action_mask, hindsight_mask, old_lp, teacher_lp, advantages,
                  base_advantages: Optional[list[float]]) -> list[dict[str, Any]]:
    """Per-token values of one response. ``base_advantages`` (SERL step only): the outcome's advantage before the
    credit rule; a targeted token then carries it, the factor the rule applied (``serl_weight``, undefined where the
    base is 0: only ``additive`` credits such tokens) and whether the rule flipped its sign."""
    out = []
    for i, tok in enumerate(response_ids):
        targeted = bool(hindsight_mask[i]) if i < len(hindsight_mask) else False
        # NaN: the token is outside a top-k teacher's k ids
        known = targeted and not math.isnan(teacher_lp[i])
        gap = teacher_lp[i] - old_lp[i] if known else None
        advantage = float(advantages[i]) if i < len(advantages) else 0.0
        base = float(base_advantages[i]) if (base_advantages is not None and targeted) else None
        out.append({
            "text": tokenizer.decode([tok], skip_special_tokens=False, clean_up_tokenization_spaces=False),
            "action": int(action_mask[i]) if i < len(action_mask) else 0,
            "targeted": int(targeted),
            "advantage": advantage,
            "base_advantage": base,
            "old_lp": float(old_lp[i]),
            "teacher_lp": float(teacher_lp[i]) if known else None,
            "gap": float(gap) if gap is not None else None,
            "serl_weight": advantage / base if base else None,
            "flipped": int(base is not None and advantage * base < 0),
            "kl": float(math.exp(max(-20.0, min(20.0, gap))) - gap - 1.0) if gap is not None else None,
        })
    return out


def trajectory_record(step: int, experiment: str, uid: str, extra: dict, prompt_text: str,
                      tokens: list[dict], feedback: dict[int, str]) -> dict[str, Any]:
    env = extra.get("hs_env") or {}
    turns = []
    for t in extra.get("hs_turns") or []:
        turn = int(t["turn"])
        turns.append({"turn": turn, "observation": t.get("observation", ""), "action": t.get("action"),
                      "error": t.get("error"), "next_observation": t.get("next_observation", ""),
                      "targeted": turn in feedback, "feedback": feedback.get(turn)})
    return {"step": step, "experiment": experiment, "uid": uid, "task_id": env.get("task_id", ""),
            "env": env.get("env", ""), "success": bool(env.get("success", False)),
            "return": float(env.get("return", 0.0)), "failure": env.get("failure") or None,
            "prompt": prompt_text, "turns": turns, "tokens": tokens}


def write_step(dump_dir: str, step: int, records: list[dict]) -> str:
    os.makedirs(dump_dir, exist_ok=True)
    path = os.path.join(dump_dir, f"step_{step}.jsonl")
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def dump_batch(batch, *, dump_dir: str, max_rows: int, tokenizer, step: int, experiment: str, with_stage: bool,
               base_advantages=None, feedback: Optional[dict] = None) -> None:
    """Write the first ``max_rows`` non-padding rows of the batch (read from TransferQueue) as ``step_<k>.jsonl``.

    ``base_advantages``: (bs, response_length) the outcome's advantage before SERL's credit rule; ``feedback``:
    (row, turn) -> text the teacher saw."""
    from verl_hindsight.hindsight.teacher_sequences import sampled_log_probs
    from verl_hindsight.trainer import batch_io as io

    rows = [i for i, pad in enumerate(io.is_padding(batch)) if not pad][:max_rows]
    if not rows:
        return
    fields = ["prompts", "responses", "action_mask", "old_log_probs", "advantages", "extra_fields", "uid"]
    if with_stage:
        fields += ["teacher_ids", "teacher_logprobs", "hindsight_mask"]
    data = io.get(batch, fields, keys=[batch.keys[i] for i in rows])
    extra, uids = io.objects(data, "extra_fields"), io.objects(data, "uid")
    feedback = feedback or {}
    columns = {name: io.rows(data[name]) for name in fields if name not in ("extra_fields", "uid")}
    records = []
    for k, row in enumerate(rows):
        response = columns["responses"][k].tolist()
        n = len(response)
        hmask = columns["hindsight_mask"][k].tolist() if with_stage else [0] * n
        prompt_ids = columns["prompts"][k]
        teacher = (sampled_log_probs(columns["teacher_ids"][k], columns["teacher_logprobs"][k], len(prompt_ids),
                                     columns["responses"][k]).tolist() if with_stage else [0.0] * n)
        tokens = token_records(tokenizer, response, columns["action_mask"][k].tolist(), hmask,
                               columns["old_log_probs"][k].float().tolist(), teacher,
                               columns["advantages"][k].float().tolist(),
                               base_advantages[row, :n].float().tolist() if base_advantages is not None else None)
        prompt = tokenizer.decode(prompt_ids.tolist(), skip_special_tokens=False)
        turn_feedback = {turn: text for (i, turn), text in feedback.items() if i == row}
        records.append(trajectory_record(step, experiment, str(uids[k]), extra[k] if isinstance(extra[k], dict) else {},
                                         prompt, tokens, turn_feedback))
    write_step(dump_dir, step, records)
