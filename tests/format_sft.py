"""Teach a tiny random model the toy agent's *output format* only (test helper).

Trains on chat-rendered toy episodes whose assistant turns are ``<action>K</action>`` with K drawn uniformly
at random, so the model learns to answer in the tag format but learns nothing about which key is right.
"""

import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from verl_hindsight.agent_loops.prompts import initial_messages
from verl_hindsight.envs import make_env


def format_sft(model_dir, out_dir, steps: int = 120, seed: int = 0, lr: float = 3e-3) -> str:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    env = make_env("toy")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    tasks = env.task_ids("train")
    for _ in range(steps):
        batch_ids, batch_labels = [], []
        for _ in range(16):
            obs = env.reset(rng.choice(tasks))
            messages = initial_messages(env.instructions, obs.text)
            n_turns = rng.randint(1, 3)
            for t in range(n_turns):
                key = rng.choice(env.keys)
                messages.append({"role": "assistant", "content": f"<action>{key}</action>"})
                if t < n_turns - 1:
                    messages.append({"role": "user", "content": f"Door {t + 2} of 4 is {rng.choice(env.colours)}."})
            ids, labels = [], []
            for i, m in enumerate(messages):
                prefix = tok.apply_chat_template(messages[:i], tokenize=False) if i else ""
                full = tok.apply_chat_template(messages[: i + 1], tokenize=False)
                piece = tok.encode(full[len(prefix):], add_special_tokens=False)
                ids += piece
                if m["role"] == "assistant":
                    head = len(tok.encode("<|im_start|>assistant\n", add_special_tokens=False))
                    labels += [-100] * head + piece[head:]
                else:
                    labels += [-100] * len(piece)
            batch_ids.append(ids)
            batch_labels.append(labels)
        width = max(map(len, batch_ids))
        input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in batch_ids])
        labels = torch.tensor([y + [-100] * (width - len(y)) for y in batch_labels])
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch_ids])
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)
