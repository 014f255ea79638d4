"""``verl-hindsight lift ENV --model DIR``: is the hindsight feedback informative for *this* model on *this* env?

Every method here assumes that the policy, shown the hindsight feedback, puts more probability on the right action
than without it. This measures that premise before any training, forward-only, through the training code path
(the env workers, the chat template and verl's turn-by-turn token builder, the registered feedback sources, the
teacher-sequence splicing and the scorer the stage uses):

1. play the environment's oracle through a task (the *correct* episode);
2. replay it up to a sampled turn t, take a *wrong* action there instead (another admissible action, or for tool
   environments a perturbed call), continue with the oracle for ``after_wrong`` more turns and stop: the
   *failed* episode, grouped with the correct one as two rollouts of one task;
3. ask each feedback source for its text at turn t of the failed episode (the model itself writes the analyzer's
   answer for ``analyzer``);
4. score both actions at turn t, with the student's context and with the teacher's (the same context with the
   feedback spliced in): ``lift = log pi_T(action | context + feedback) - log pi_S(action | context)``, summed
   over the action's tokens.

Per source: the mean lift of the correct and of the wrong action, the margin change (correct minus wrong lift;
> 0 means the feedback moves probability toward the correct action), and how often the teacher ranks the correct
action above the wrong one where the student did not ("fixed") or the reverse ("broken").
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

DEFAULT_SOURCES = ("immediate", "next_observation", "future", "successful_sibling", "analyzer")


@dataclass
class Step:
    """One turn as the agent loop would record it."""

    observation: str
    action: str  # what the env executes (text action or tool payload)
    model_text: str  # the assistant text that carries it
    result: Any  # StepResult


@dataclass
class Pair:
    task_id: str
    turn: int  # the sampled turn (0-based)
    correct: list[Step]
    wrong: list[Step]
    instructions: str
    tools: Optional[list[dict]]


@dataclass
class Case:
    task_id: str
    turn: int
    source: str
    feedback: Optional[str]  # None: the source had nothing for this turn
    student_correct: float
    student_wrong: float
    teacher_correct: Optional[float] = None
    teacher_wrong: Optional[float] = None

    @property
    def measured(self) -> bool:
        return self.teacher_correct is not None

    @property
    def lift_correct(self) -> float:
        return self.teacher_correct - self.student_correct

    @property
    def lift_wrong(self) -> float:
        return self.teacher_wrong - self.student_wrong


@dataclass
class SourceSummary:
    source: str
    cases: int  # sampled turns
    covered: int  # turns the source gave feedback for
    lift_correct: float
    lift_wrong: float
    margin_change: float
    fixed: int  # teacher prefers the correct action, the student did not
    student_wrong_first: int  # cases where the student did not prefer the correct action
    broken: int  # the student preferred the correct action, the teacher does not
    student_right_first: int
    helps_wrong_more: int  # cases with lift_wrong > lift_correct


@dataclass
class LiftReport:
    env: str
    model: str
    seed: int
    sources: list[str]
    summaries: list[SourceSummary] = field(default_factory=list)
    cases: list[Case] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (task, reason)
    analyzer: dict[str, float] = field(default_factory=dict)  # the model-as-analyzer's hindsight/analyzer_* counts

    def to_json(self) -> dict:
        cases = []
        for c in self.cases:
            d = asdict(c)
            if c.measured:
                d.update(lift_correct=c.lift_correct, lift_wrong=c.lift_wrong,
                         margin_change=c.lift_correct - c.lift_wrong)
            cases.append(d)
        return {"env": self.env, "model": self.model, "seed": self.seed, "sources": self.sources,
                "summaries": [asdict(s) for s in self.summaries], "cases": cases,
                "skipped": [list(s) for s in self.skipped], "analyzer": self.analyzer}


class LiftError(ValueError):
    """A user-facing refusal (one line naming the fix)."""


# ---------------------------------------------------------------------------------------------- episodes


def _same_action(a: str, b: str, tool_env: bool) -> bool:
    if tool_env:
        return json.loads(a).get("tool_calls") == json.loads(b).get("tool_calls")
    return " ".join(a.split()).lower() == " ".join(b.split()).lower()


def perturb_call(payload: str, tools: Optional[list[dict]], rng: random.Random) -> Optional[str]:
    """A wrong tool call near the oracle's: another declared function with the same arguments, or one argument
    changed (a number moved by one, a boolean flipped, an enum value swapped, a string reversed). None when the
    payload has no call to perturb."""
    data = json.loads(payload)
    calls = [dict(c, arguments=dict(c.get("arguments") or {})) for c in data.get("tool_calls") or []]
    if not calls:
        return None
    call = calls[rng.randrange(len(calls))]
    names = [t.get("function", t).get("name") for t in tools or []]
    others = [n for n in names if n and n != call["name"]]
    args = call["arguments"]
    if others and (not args or rng.random() < 0.5):
        call["name"] = rng.choice(others)
    elif args:
        key = rng.choice(sorted(args))
        value = args[key]
        schema = next((t.get("function", t) for t in tools or [] if t.get("function", t).get("name") == call["name"]),
                      {})
        enum = (((schema.get("parameters") or {}).get("properties") or {}).get(key) or {}).get("enum") or []
        if isinstance(value, bool):
            args[key] = not value
        elif isinstance(value, (int, float)):
            args[key] = value + rng.choice([-1, 1])
        elif isinstance(value, str) and len([e for e in enum if e != value]) > 0:
            args[key] = rng.choice([e for e in enum if e != value])
        elif isinstance(value, str) and len(set(value)) > 1:
            args[key] = value[::-1]
        else:
            args[key] = f"{value}_x" if isinstance(value, str) else None
    else:
        return None
    return json.dumps({"content": data.get("content", ""), "tool_calls": calls})


def _oracle(session, env: str, task_id: str) -> str:
    action = session.oracle_action()
    if action is None:
        raise LiftError(f"environment {env!r} has no oracle action at the start of task {task_id!r}: lift needs "
                        "the environment's reference solution (Environment.oracle_action) to know the correct action")
    return action


def play_pair(pool, env: str, task_id: str, rng: random.Random, max_turns: int, after_wrong: int) -> Pair | str:
    """The correct and the failed episode of ``task_id`` (see the module docstring); a reason string to skip."""
    from verl_hindsight.agent_loops.env_check import write_action  # imports verl: not at `--help` time

    with pool.session() as s:
        here = s.reset(task_id).text
        instructions, tools = s.instructions(), s.tools()
        tool_env = tools is not None
        correct: list[Step] = []
        action = _oracle(s, env, task_id)
        for _ in range(max_turns):
            result = s.step(action)
            correct.append(Step(here, action, write_action(action, tool_env), result))
            if result.done:
                break
            here = result.observation
            action = s.oracle_action()
            if action is None:
                break
    if not (correct and correct[-1].result.done and correct[-1].result.info.get("success")):
        return "oracle_did_not_succeed"
    # turns that carry an action to score and to perturb (tool environments also answer with plain text)
    eligible = [k for k, st in enumerate(correct)
                if not tool_env or json.loads(st.action).get("tool_calls")]
    if not eligible:
        return "no_action_turn"
    turn = rng.choice(eligible)
    with pool.session() as s:
        here = s.reset(task_id).text
        wrong: list[Step] = []
        for t in range(turn):
            s.oracle_action()  # envs that track what the oracle said (BFCL) see the same calls as in the replay
            result = s.step(correct[t].action)
            wrong.append(Step(correct[t].observation, correct[t].action, correct[t].model_text, result))
            here = result.observation
        if here != correct[turn].observation:
            return "replay_diverged"
        bad = None
        for _ in range(20):
            try:
                candidate = (perturb_call(correct[turn].action, tools, rng) if tool_env
                             else s.random_action(rng.randrange(1 << 30)))
            except NotImplementedError:
                candidate = None
            if candidate is not None and not _same_action(candidate, correct[turn].action, tool_env):
                bad = candidate
                break
        if bad is None:
            return "no_wrong_action"
        result = s.step(bad)
        wrong.append(Step(here, bad, write_action(bad, tool_env), result))
        for _ in range(after_wrong):
            if result.done:
                break
            action = s.oracle_action()
            if action is None:
                break
            observation = result.observation
            result = s.step(action)
            wrong.append(Step(observation, action, write_action(action, tool_env), result))
    return Pair(task_id, turn, correct, wrong, instructions, tools)


# ---------------------------------------------------------------------------------------------- records


def trajectory(pair: Pair, steps: list[Step], uid: str, tool_env: bool):
    """The hindsight stage's record of an episode (what the agent loop would have recorded)."""
    from verl_hindsight.agent_loops.tool_calls import display_calls
    from verl_hindsight.hindsight.records import Trajectory, TurnRecord

    turns = []
    for k, st in enumerate(steps):
        info = st.result.info or {}
        display = st.action
        if tool_env:
            display = display_calls(json.loads(st.action)["tool_calls"])
        turns.append(TurnRecord(
            turn=k, response_span=(0, 0), has_action=True, action=display, observation=st.observation,
            anchor=st.observation, feedback=info.get("error") or st.result.observation, error=info.get("error"),
            next_observation=st.result.observation, reward=float(st.result.reward), done=bool(st.result.done),
            invalid_action=bool(info.get("invalid_action", False))))
    last = steps[-1].result
    success = bool(last.done and (last.info or {}).get("success"))
    return Trajectory(uid=uid, turns=tuple(turns), success=success,
                      episode_return=sum(float(st.result.reward) for st in steps), task_id=pair.task_id)


# ---------------------------------------------------------------------------------------------- scoring


class Scorer:
    """Builds the student's tokens turn by turn (verl's token builder, as the agent loop does) and scores the
    action at the sampled turn with and without spliced feedback (the stage's splicing). Log-probs are the stage's
    ``log p(x_j | x_<j)``, computed with logits for the action's positions only: both sequences end with the
    action, and a 262k-token vocabulary makes full logits 1 GiB per 1k tokens (tau2's prompts are ~10k)."""

    def __init__(self, model, tokenizer, hf_model_type: Optional[str]):
        from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

        from verl_hindsight.hindsight.teacher_sequences import FeedbackRenderer

        self.model, self.tok = model, tokenizer
        self.builder = create_continuous_token_builder(tokenizer, hf_model_type=hf_model_type)
        self.renderer = FeedbackRenderer(tokenizer, hf_model_type=hf_model_type)

    def _gen_ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]

    def context(self, pair: Pair, tool_env: bool) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids up to the sampled turn's assistant message)."""
        from verl_hindsight.agent_loops.prompts import initial_messages

        first = pair.correct[0].observation
        messages = ([{"role": "system", "content": pair.instructions}, {"role": "user", "content": first}]
                    if tool_env else initial_messages(pair.instructions, first))
        prompt = self.builder.build_initial_tokens(messages, tools=pair.tools)
        runtime = list(prompt)
        for st in pair.correct[:pair.turn]:
            runtime = self.builder.merge_assistant_tokens(runtime, self._gen_ids(st.model_text)).token_ids
            previous = messages + [{"role": "assistant", "content": st.model_text}]
            role = "user" if (not tool_env or (st.result.info or {}).get("observation_role") == "user") else "tool"
            messages = previous + [{"role": role, "content": st.result.observation}]
            runtime = self.builder.merge_context_tokens(previous, messages, runtime, tools=pair.tools).token_ids
        return prompt, runtime[len(prompt):]

    def action_tokens(self, model_text: str, tool_env: bool) -> tuple[list[int], int, int]:
        """The assistant message's ids and the [start, end) of its action tokens (the agent loop's span rule)."""
        from verl_hindsight.agent_loops.tool_calls import parse_tool_calls
        from verl_hindsight.spans import char_span_to_token_span, parse_tagged_action

        ids = self._gen_ids(model_text)
        text = self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        parsed = (parse_tool_calls(text) if tool_env
                  else parse_tagged_action(text, "action", end_markers=(self.tok.eos_token,)))
        a, b = char_span_to_token_span(self.tok, ids, *parsed.char_span)
        return ids, a, b

    def log_probs_from(self, seq, first: int):
        """``log p(x_j | x_<j)`` for j = first .. len(seq) - 1 (index j - first)."""
        import torch

        ids = torch.as_tensor(seq, dtype=torch.long)
        with torch.no_grad():
            logits = self.model(input_ids=ids[None], logits_to_keep=len(ids) - first + 1).logits[0, :-1].float()
        return logits.log_softmax(-1).gather(-1, ids[first:, None]).squeeze(-1)

    def student(self, prompt: list[int], response: list[int], a: int, b: int) -> float:
        first = len(prompt) + a
        return float(self.log_probs_from(prompt + response, first)[:b - a].sum())

    def teacher(self, prompt: list[int], response: list[int], message_start: int, a: int, b: int,
                feedback: str) -> float:
        from verl_hindsight.hindsight.teacher_sequences import TargetTurn, plan_teacher_sequences

        plan = plan_teacher_sequences(prompt, response, [TargetTurn(0, message_start, a, b, feedback)],
                                      self.renderer)
        if not plan.sequences:
            raise RuntimeError(f"lift: the teacher sequence was not built ({plan.skipped})")
        seq = plan.sequences[0]
        scored = [int(t) for _, t in seq.positions.tolist()]
        logp = self.log_probs_from(seq.token_ids, min(scored))
        return float(sum(logp[t - min(scored)] for t in scored))


def model_analyzer(model, tokenizer, max_new_tokens: int) -> Callable:
    """The model as its own HINT-SD analyzer (greedy), through the same prompt and parser as training."""
    import torch

    from verl_hindsight.hindsight.analyzer import _ids_from_template

    @torch.no_grad()
    def answer(messages) -> str:
        ids = _ids_from_template(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    return answer


# ---------------------------------------------------------------------------------------------- driver


def summarize(source: str, cases: list[Case]) -> SourceSummary:
    mine = [c for c in cases if c.source == source]
    done = [c for c in mine if c.measured]
    mean = (lambda xs: sum(xs) / len(xs) if xs else float("nan"))  # noqa: E731
    student_wrong_first = [c for c in done if not c.student_correct > c.student_wrong]
    student_right_first = [c for c in done if c.student_correct > c.student_wrong]
    return SourceSummary(
        source=source, cases=len(mine), covered=len(done),
        lift_correct=mean([c.lift_correct for c in done]), lift_wrong=mean([c.lift_wrong for c in done]),
        margin_change=mean([c.lift_correct - c.lift_wrong for c in done]),
        fixed=sum(c.teacher_correct > c.teacher_wrong for c in student_wrong_first),
        student_wrong_first=len(student_wrong_first),
        broken=sum(not c.teacher_correct > c.teacher_wrong for c in student_right_first),
        student_right_first=len(student_right_first),
        helps_wrong_more=sum(c.lift_wrong > c.lift_correct for c in done))


def run_lift(env: str, model_dir: str | Path, *, sources: tuple[str, ...] = DEFAULT_SOURCES, tasks: int = 8,
             seed: int = 0, split: str = "val", env_kwargs: Optional[dict] = None, max_turns: int = 30,
             after_wrong: int = 2, analyzer_tokens: int = 256, progress: bool = True) -> LiftReport:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from verl_hindsight.config import FeedbackConfig
    from verl_hindsight.environment.protocol import prepare_env, registered_envs
    from verl_hindsight.environment.runner import EnvFailure, RunnerLimits, get_pool
    from verl_hindsight.hindsight.analyzer import run_analyzer
    from verl_hindsight.hindsight.feedback import compute_feedback, get_feedback_source

    if env not in registered_envs():
        raise LiftError(f"unknown environment {env!r}; registered: {', '.join(registered_envs())}")
    for source in sources:
        try:
            get_feedback_source(source)
        except KeyError as exc:
            raise LiftError(str(exc.args[0])) from None
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise LiftError(f"--model {model_dir}: not a transformers model folder (no config.json); "
                        "e.g. `verl-hindsight fetch-model gemma3-270m` prints one")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        raise LiftError(f"--model {model_dir}: the tokenizer has no chat template; the agent loops need one")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scorer = Scorer(model, tokenizer, AutoConfig.from_pretrained(model_dir).model_type)
    answer_fn = model_analyzer(model, tokenizer, analyzer_tokens) if "analyzer" in sources else None

    prepare_env(env, env_kwargs, progress=progress)
    pool = get_pool(env, env_kwargs or {}, RunnerLimits(step_timeout_s=120.0))
    with pool.session() as s:
        task_ids = s.task_ids(split)[:tasks]
    report = LiftReport(env=env, model=str(model_dir), seed=seed, sources=list(sources))
    rng = random.Random(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(task_ids), desc=f"lift {env}", unit="task")
    for task_id in task_ids:
        try:
            pair = play_pair(pool, env, task_id, rng, max_turns, after_wrong)
        except EnvFailure as exc:
            pair = f"env_failure:{exc.reason}"
        if isinstance(pair, str):
            report.skipped.append((task_id, pair))
            if bar:
                bar.update()
            continue
        tool_env = pair.tools is not None
        failed = trajectory(pair, pair.wrong, task_id, tool_env)
        group = [failed, trajectory(pair, pair.correct, task_id, tool_env)]
        if answer_fn is not None:
            picks, metrics = run_analyzer([failed], answer_fn, k=3, only_failed=True, concurrency=1)
            for key, value in metrics.items():
                report.analyzer[key] = report.analyzer.get(key, 0.0) + float(value)
            group[0] = replace(failed, extra={"hs_analysis": {"steps": picks.get(0, [])}})
        prompt, before = scorer.context(pair, tool_env)
        scored = {}
        for name, step in (("correct", pair.correct[pair.turn]), ("wrong", pair.wrong[pair.turn])):
            ids, a, b = scorer.action_tokens(step.model_text, tool_env)
            response = before + ids
            start = len(before)
            scored[name] = (response, start, start + a, start + b)
        student = {n: scorer.student(prompt, r, a, b) for n, (r, _, a, b) in scored.items()}
        for source in sources:
            texts, _ = compute_feedback(group, FeedbackConfig(source=source))
            text = texts.get((0, pair.turn))
            case = Case(task_id, pair.turn, source, text, student["correct"], student["wrong"])
            if text:
                case.teacher_correct, case.teacher_wrong = (
                    scorer.teacher(prompt, *scored[n], text) for n in ("correct", "wrong"))
            report.cases.append(case)
        if bar:
            bar.update()
    if bar:
        bar.close()
    report.summaries = [summarize(s, report.cases) for s in sources]
    return report


def format_table(report: LiftReport) -> str:
    head = (f"lift on {report.env} ({len({c.task_id for c in report.cases})} tasks, seed {report.seed}; "
            f"model {report.model})\n"
            "log-probs summed over the action's tokens; lift = teacher - student; margin = correct - wrong\n")
    rows = ["| source | covered | lift correct | lift wrong | margin change | fixed | broken | wrong lifted more |",
            "|---|---|---|---|---|---|---|---|"]
    for s in report.summaries:
        if not s.covered:  # no feedback from this source: nothing to average (not a lift of nan)
            rows.append(f"| {s.source} | 0/{s.cases} | | | | | | |")
            continue
        rows.append(f"| {s.source} | {s.covered}/{s.cases} | {s.lift_correct:+.2f} | {s.lift_wrong:+.2f} | "
                    f"{s.margin_change:+.2f} | {s.fixed}/{s.student_wrong_first} | {s.broken}/{s.student_right_first}"
                    f" | {s.helps_wrong_more}/{s.covered} |")
    tail = ""
    if report.analyzer:
        tail += "\nmodel as analyzer: " + ", ".join(f"{k.removeprefix('hindsight/')} {v:g}"
                                                  for k, v in sorted(report.analyzer.items()) if v)
    if report.skipped:
        tail += "\nskipped: " + ", ".join(f"{t} ({why})" for t, why in report.skipped)
    return head + "\n".join(rows) + tail


def run_cli(args) -> int:
    try:
        report = run_lift(args.env, args.model, sources=tuple(s.strip() for s in args.sources.split(",") if s.strip()),
                          tasks=args.tasks, seed=args.seed, split=args.split, env_kwargs=args.env_kwargs,
                          max_turns=args.max_turns, after_wrong=args.after_wrong,
                          analyzer_tokens=args.analyzer_tokens, progress=not args.no_progress)
    except LiftError as exc:
        raise SystemExit(f"verl-hindsight lift: {exc}") from None
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1))
        print(f"wrote {args.json}")
    return 0
