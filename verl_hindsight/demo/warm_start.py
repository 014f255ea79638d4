"""Supervised warm start of the tiny model for the toy corridor: the output format, and following a hint in context.

Trains on toy episodes rendered exactly as the text agent loop renders them (system prompt, door observations as
user turns, ``<action>K</action>`` answers). With probability ``hint_prob`` a turn is preceded by the same
feedback message the self-teacher sees (``Consider the following feedback ...`` + ``wrong key: the <colour> door
opens with <key>``) and the target is the hinted key. Hints come from a *random* colour-to-key permutation drawn
per episode, and un-hinted turns get a uniformly random key: the model learns to answer in the format and to
follow a hint placed in context, but never the task's hidden rule, so every method starts from a uniform policy.
``hint_prob=0`` teaches the format only.
"""

from __future__ import annotations

import random
from pathlib import Path

from verl_hindsight.agent_loops.prompts import initial_messages
from verl_hindsight.envs.toy import KeyDoorCorridor
from verl_hindsight.hindsight.teacher_sequences import DEFAULT_FEEDBACK_TEMPLATE


def _episode(env: KeyDoorCorridor, rng: random.Random, hint_prob: float,
             unhinted_target: str = "random") -> list[dict]:
    task = rng.choice(env.task_ids("train"))
    obs = env.reset(task)
    colours = task.split("-")
    rule = dict(zip(env.colours, rng.sample(list(env.keys), len(env.keys))))  # random, not the hidden rule
    messages = initial_messages(env.instructions, obs.text)
    n_turns = rng.randint(1, env.n_doors)
    hinted: set[str] = set()
    for t in range(n_turns):
        if rng.random() < hint_prob:
            hint = f"wrong key: the {colours[t]} door opens with {rule[colours[t]]}"
            messages.append({"role": "user", "content": DEFAULT_FEEDBACK_TEMPLATE.format(feedback=hint)})
            key = rule[colours[t]]
            unlabelled = False
            hinted.add(colours[t])
        elif unhinted_target == "recall" and colours[t] in hinted:
            # an earlier hint in this episode named this colour's key: answering it needs the colour
            key, unlabelled = rule[colours[t]], False
        else:
            key = rng.choice(env.keys)
            unlabelled = unhinted_target == "none"
        messages.append({"role": "assistant", "content": f"<action>{key}</action>", "no_key_label": unlabelled})
        if t < n_turns - 1:
            messages.append({"role": "user", "content": f"Door {t + 2} of {env.n_doors} is {colours[t + 1]}."})
    return messages


def _tokenize(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Ids of the rendered conversation and labels on the assistant answers only, tokenized as a rollout sees them:
    the context up to each answer rendered with the template's generation prompt, then the answer. Rendering message
    by message would not do: a template may fold the system text into the first user turn (Gemma's does), so a
    shorter conversation's render is not always a prefix of a longer one's; one that ends with an answer is."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids, labels, done = [], [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        opened = tok.apply_chat_template(plain[:i], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(plain[: i + 1], tokenize=False)
        context = tok.encode(opened[len(done):], add_special_tokens=False)
        answer = tok.encode(full[len(opened):], add_special_tokens=False)
        label = list(answer)
        if m.get("no_key_label"):
            label[len(tok.encode("<action>", add_special_tokens=False))] = -100  # the format only, not the key
        ids += context + answer
        labels += [-100] * len(context) + label
        done = full
    rest = tok.encode(tok.apply_chat_template(plain, tokenize=False)[len(done):], add_special_tokens=False)
    return ids + rest, labels + [-100] * len(rest)


def warm_start(model_dir, out_dir, steps: int = 300, seed: int = 0, lr: float = 3e-3, hint_prob: float = 0.5,
               batch_size: int = 16, env_kwargs: dict | None = None, progress=None,
               unhinted_target: str = "random") -> str:
    """``unhinted_target``: ``random`` trains un-hinted turns on a uniformly random key (the demo's warm start:
    a uniform starting policy, but it teaches the model that the colour is irrelevant, which costs plasticity);
    ``none`` trains only their format tokens."""
    if unhinted_target not in ("random", "none", "recall"):
        raise ValueError(f"unhinted_target must be 'random' or 'none', got {unhinted_target!r}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    env = KeyDoorCorridor(**(env_kwargs or {}))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = [_tokenize(tok, _episode(env, rng, hint_prob, unhinted_target)) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        attn = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(float(loss.detach()))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def hint_following(model_dir, n: int = 256, seed: int = 1, env_kwargs: dict | None = None) -> dict[str, float]:
    """Probe: P(hinted key) with a random hint in context vs accuracy of the hidden rule without one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    env = KeyDoorCorridor(**(env_kwargs or {}))
    key_ids = {k: tok.encode(k, add_special_tokens=False)[0] for k in env.keys}
    hinted_p, hinted_top, rule_top = [], 0, 0
    for _ in range(n):
        task = rng.choice(env.task_ids("val"))
        obs = env.reset(task)
        colour = task.split("-")[0]
        hint_key = rng.choice(env.keys)
        base = initial_messages(env.instructions, obs.text)
        for with_hint in (True, False):
            messages = list(base)
            if with_hint:
                hint = f"wrong key: the {colour} door opens with {hint_key}"
                messages.append({"role": "user", "content": DEFAULT_FEEDBACK_TEMPLATE.format(feedback=hint)})
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "<action>"
            ids = tok.encode(text, add_special_tokens=False)
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            probs = {k: float(logp[i].exp()) for k, i in key_ids.items()}
            best = max(probs, key=probs.get)
            if with_hint:
                hinted_p.append(probs[hint_key])
                hinted_top += best == hint_key
            else:
                rule_top += best == env.rule[colour]
    return {"p_hinted_key": sum(hinted_p) / n, "hinted_key_top1": hinted_top / n, "rule_top1_without_hint": rule_top / n}
