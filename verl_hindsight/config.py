"""Every setting verl-hindsight reads, as typed dataclasses in verl's config style, and the one function that parses
them from a hydra config.

Two config blocks:

- ``hindsight``: :class:`HindsightConfig` (the stage, the teacher, the distillation term, the analyzer and the
  environment agent loops);
- ``algorithm.serl``: :class:`SERLConfig` (the ``serl`` advantage estimator).

The defaults ship as ``recipes/hindsight_defaults.yaml`` (installed as ``verl_hindsight.recipes``); a config that
includes it can set ``hindsight.*`` without a ``+`` prefix. The dataclass defaults and that file are kept equal by a
unit test. Like verl's own configs (:class:`verl.base_config.BaseConfig`), instances are read-only after
construction and behave as mappings; :func:`verl.utils.config.omega_conf_to_dataclass` does the conversion, so an
unknown key or a value of the wrong type fails with the key's full name. ``__post_init__`` checks the values a
block can check alone; :meth:`HindsightConfig.validate` checks combinations with the rest of the run's config.

This module is the bottom layer of the package: it imports nothing from ``verl_hindsight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from verl.base_config import BaseConfig

SECTION = "hindsight"
#: ``trainer.v1.trainer_mode`` of the plugin's trainer, the only one that applies the ``hindsight`` block
TRAINER_MODE = "hindsight"

TEACHER_KINDS = ("frozen", "ema", "lagged", "live")
#: teacher kinds whose weights live in the worker's reference model (scored by compute_ref_log_prob)
REF_TEACHERS = ("frozen", "ema", "lagged")
PLACEMENTS = ("turn", "anchor")
TURN_MODES = ("all", "with_feedback", "analyzer_first", "analyzer_topk")
TRAJECTORY_MODES = ("failed", "all")
DIVERGENCES = ("k1", "k3", "jsd", "topk_tail")
ANALYZER_ROLES = ("none", "analyzer", "reflector", "judge")
ANALYZER_CLIENTS = ("policy", "openai")

DEFAULT_FEEDBACK_TEMPLATE = "Consider the following feedback to solve this step:\n\n{feedback}"
DEFAULT_FORMAT_INSTRUCTIONS = "Answer with your action inside <{tag}></{tag}>."

#: verl estimators SERL can reweight: outcome estimators that need only rewards, the response mask and group ids
#: (no critic, no reward baselines, no extra batch fields)
SERL_BASE_ESTIMATORS = ("grpo", "grpo_vectorized", "grpo_passk", "rloo", "rloo_vectorized", "reinforce_plus_plus",
                        "reinforce_plus_plus_baseline", "opo", "gpg")
#: of those, the ones verl's V1 trainer broadcasts over an episode that spans several rows (hindsight.env
#: history_turns): it computes the group statistics on each episode's last row only for GRPO
MULTI_ROW_BASE_ESTIMATORS = ("grpo",)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass
class FeedbackConfig(BaseConfig):
    """``hindsight.feedback``: what hindsight text the teacher sees, and at which turns."""

    source: str = "immediate"  # a registered feedback source, or several joined with '+'
    placement: str = "turn"  # turn | anchor
    similarity: Optional[float] = None  # anchor placement: difflib ratio threshold (SERL: 0.95); null = exact match
    max_chars: Optional[int] = 4000  # per feedback text, clipped from the start (the end is kept); null = no clip

    def __post_init__(self):
        if not self.source or any(not part.strip() for part in self.source.split("+")):
            raise ValueError(f"hindsight.feedback.source must name one or more sources joined with '+', "
                             f"got {self.source!r}")
        _check_choice("hindsight.feedback.placement", self.placement, PLACEMENTS)
        if self.similarity is not None and not 0.0 < self.similarity <= 1.0:
            raise ValueError(f"hindsight.feedback.similarity must be in (0, 1] or null, got {self.similarity!r}")
        if self.max_chars is not None and self.max_chars < 1:
            raise ValueError(f"hindsight.feedback.max_chars must be >= 1 or null, got {self.max_chars!r}")

    @property
    def sources(self) -> list[str]:
        return [part.strip() for part in self.source.split("+")]


@dataclass
class TargetConfig(BaseConfig):
    """``hindsight.targets``: which turns of which trajectories get hindsight credit, and which of their tokens."""

    turns: str = "with_feedback"  # all | with_feedback | analyzer_first | analyzer_topk
    k: int = 3  # analyzer_topk: at most this many turns per trajectory (HINT-SD multi: 3)
    trajectories: str = "all"  # failed: unsuccessful rollouts only (HINT-SD); all (SERL)
    # action: the action tokens only (SERL's placement); message: every token the policy generated in the turn
    # (HINT-SD's released loss covers the step's whole response)
    span: str = "action"

    def __post_init__(self):
        _check_choice("hindsight.targets.turns", self.turns, TURN_MODES)
        _check_choice("hindsight.targets.trajectories", self.trajectories, TRAJECTORY_MODES)
        _check_choice("hindsight.targets.span", self.span, ("action", "message"))
        if self.k < 1:
            raise ValueError(f"hindsight.targets.k must be >= 1, got {self.k!r}")

    @property
    def uses_analyzer(self) -> bool:
        return self.turns.startswith("analyzer")


@dataclass
class TeacherConfig(BaseConfig):
    """``hindsight.teacher``: which weights score the teacher sequences, and how those sequences are built."""

    # frozen: the initial policy (verl's reference model); ema: lerp toward the policy after every update
    # (HINT-SD: decay 0.999); lagged: a copy of the policy every sync_interval updates (SERL: 10); live: the
    # current policy
    kind: str = "frozen"
    mode: str = "isolated"  # isolated: one teacher sequence per targeted turn | cumulative: one per trajectory
    max_length: Optional[int] = None  # null: rollout prompt_length + response_length
    overflow: str = "truncate_left"  # truncate_left | skip
    feedback_template: str = DEFAULT_FEEDBACK_TEMPLATE
    ema_decay: float = 0.999
    sync_interval: int = 10
    # collapse flag: targeted-token |gap| below collapse_gap while episode success stays below collapse_success
    collapse_gap: float = 0.02
    collapse_success: float = 0.5
    log_probe: bool = False  # score a fixed probe sequence every step (hindsight/teacher_probe_logprob)
    # target_turn: feedback right before the turn it is about (HINT-SD); episode_start: the same feedback at the
    # start of the episode (the placement ablation of HINT-SD's paper)
    insert_at: str = "target_turn"
    # What a KL to the reference (actor.use_kl_loss / algorithm.use_kl_in_reward) anchors to when the teacher moves.
    # initial: the reference model stays the initial policy and the teacher gets weights of its own, swapped in for
    # the teacher pass only. teacher: the reference model is the teacher, so the anchor moves with it (SERL's
    # released code).
    kl_anchor: str = "initial"
    # false: the no-feedback control. Targets are selected exactly as with feedback, but the teacher scores the
    # student's own context (no hindsight text inserted), so any effect left is the pull toward the teacher's weights
    insert_feedback: bool = True

    def __post_init__(self):
        _check_choice("hindsight.teacher.kind", self.kind, TEACHER_KINDS)
        _check_choice("hindsight.teacher.mode", self.mode, ("isolated", "cumulative"))
        _check_choice("hindsight.teacher.overflow", self.overflow, ("truncate_left", "skip"))
        _check_choice("hindsight.teacher.insert_at", self.insert_at, ("target_turn", "episode_start"))
        _check_choice("hindsight.teacher.kl_anchor", self.kl_anchor, ("initial", "teacher"))
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"hindsight.teacher.ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if self.sync_interval < 1:
            raise ValueError(f"hindsight.teacher.sync_interval must be >= 1, got {self.sync_interval!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"hindsight.teacher.max_length must be >= 2 or null, got {self.max_length!r}")
        if self.insert_at == "episode_start" and self.mode != "isolated":
            raise ValueError("hindsight.teacher.insert_at=episode_start needs hindsight.teacher.mode=isolated")
        if "{feedback}" not in self.feedback_template:
            raise ValueError("hindsight.teacher.feedback_template must contain '{feedback}'")
        if not self.insert_feedback and self.insert_at != "target_turn":
            raise ValueError(f"hindsight.teacher.insert_at={self.insert_at} places feedback that "
                             "hindsight.teacher.insert_feedback=false leaves out: drop one of the two")
        if not self.insert_feedback and self.kind == "live":
            raise ValueError("hindsight.teacher.insert_feedback=false with kind=live: the teacher would be the "
                             "student on the student's own context (a zero gap); use kind=frozen, ema or lagged")

    @property
    def uses_reference_model(self) -> bool:
        return self.kind in REF_TEACHERS

    @property
    def moves(self) -> bool:
        """EMA and lagged teachers are updated toward the policy during training."""
        return self.kind in ("ema", "lagged")


@dataclass
class DistillConfig(BaseConfig):
    """``hindsight.distill``: the distillation term of the actor loss."""

    coef: float = 0.0  # 0 disables the term (SERL: reweighting only)
    # k1 | k3 | jsd: sampled-token estimators; topk_tail: reverse KL over the teacher's top-k plus a tail bucket,
    # from the student's logits through verl's top-k hook (FSDP engines)
    divergence: str = "k3"
    topk: int = 8  # k of topk_tail
    jsd_beta: float = 0.5
    policy_gradient: bool = True  # false: pure distillation, no policy-gradient term (HINT-SD's released code)
    coef_decay_steps: Optional[int] = None  # linear decay of coef to 0 over this many updates; null = constant

    def __post_init__(self):
        _check_choice("hindsight.distill.divergence", self.divergence, DIVERGENCES)
        if self.topk < 1:
            raise ValueError(f"hindsight.distill.topk must be >= 1, got {self.topk!r}")
        if self.coef < 0:
            raise ValueError(f"hindsight.distill.coef must be >= 0, got {self.coef!r}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"hindsight.distill.jsd_beta must be in (0, 1), got {self.jsd_beta!r}")
        if self.coef_decay_steps is not None and self.coef_decay_steps < 1:
            raise ValueError(f"hindsight.distill.coef_decay_steps must be >= 1 or null, got {self.coef_decay_steps}")
        if not self.policy_gradient and self.coef == 0:
            raise ValueError("hindsight.distill.policy_gradient=false with coef=0 trains nothing; set coef > 0")

    @property
    def enabled(self) -> bool:
        return self.coef > 0

    def coef_at(self, updates_done: int) -> float:
        if self.coef_decay_steps is None:
            return self.coef
        return self.coef * max(0.0, 1.0 - float(updates_done) / float(self.coef_decay_steps))


@dataclass
class AnalyzerConfig(BaseConfig):
    """``hindsight.analyzer``: the model that reads a finished episode in the agent loop (HINT-SD's analyzer picks
    failure-relevant steps with corrections; HERO's reflector writes a turn-level diagnosis; SERL's judge writes an
    episode summary)."""

    role: str = "none"  # none | analyzer (HINT-SD) | reflector (HERO) | judge (SERL's judge feedback source)
    client: str = "policy"  # policy: the rollout server; openai: any OpenAI-compatible endpoint
    base_url: Optional[str] = None
    model: Optional[str] = None
    api_key_env: Optional[str] = None  # name of the environment variable holding the API key
    k: int = 3  # analyzer: at most k steps (HINT-SD multi)
    variant: str = "multi"  # analyzer: multi | single
    only_failed: Optional[bool] = None  # null: analyzer true (HINT-SD), reflector and judge false
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 512
    max_chars: int = 12000
    timeout_s: float = 60.0
    retries: int = 3  # openai client: asks again after a 429, a 5xx, a timeout or a refused connection
    retry_backoff_s: float = 1.0  # first wait; doubles per retry (a Retry-After header wins)

    def __post_init__(self):
        _check_choice("hindsight.analyzer.role", self.role, ANALYZER_ROLES)
        _check_choice("hindsight.analyzer.client", self.client, ANALYZER_CLIENTS)
        _check_choice("hindsight.analyzer.variant", self.variant, ("multi", "single"))
        if self.client == "openai" and not (self.base_url and self.model):
            raise ValueError("hindsight.analyzer.client=openai needs hindsight.analyzer.base_url and .model")
        if self.k < 1:
            raise ValueError(f"hindsight.analyzer.k must be >= 1, got {self.k!r}")
        if self.retries < 0 or self.retry_backoff_s < 0:
            raise ValueError(f"hindsight.analyzer.retries ({self.retries!r}) and .retry_backoff_s "
                             f"({self.retry_backoff_s!r}) must be >= 0 (0 retries: one request per answer)")

    @property
    def failed_only(self) -> bool:
        return self.only_failed if self.only_failed is not None else self.role == "analyzer"


@dataclass
class EnvLoopConfig(BaseConfig):
    """``hindsight.env``: the environment agent loops (any key can be overridden per loop in an
    ``agent_loop_config_path`` entry)."""

    action_tag: str = "action"
    max_turns: int = 20
    step_timeout_s: float = 30.0
    episode_timeout_s: float = 600.0
    format_instructions: str = DEFAULT_FORMAT_INSTRUCTIONS
    env_modules: list[str] = field(default_factory=list)  # modules to import in env workers (user environments)
    # null: one growing conversation per episode. K >= 1: every turn gets a fresh prompt showing only the last K
    # (observation, action) steps and is its own training row (for long episodes)
    history_turns: Optional[int] = None

    def __post_init__(self):
        if self.max_turns < 1:
            raise ValueError(f"hindsight.env.max_turns must be >= 1, got {self.max_turns!r}")
        if self.step_timeout_s <= 0 or self.episode_timeout_s <= 0:
            raise ValueError("hindsight.env.step_timeout_s and episode_timeout_s must be > 0")
        if self.history_turns is not None and self.history_turns < 1:
            raise ValueError(f"hindsight.env.history_turns must be >= 1 or null, got {self.history_turns}")


@dataclass
class HindsightConfig(BaseConfig):
    """The ``hindsight`` block."""

    enable: bool = False  # run the hindsight stage (feedback, targets, teacher log-probs) every training step
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    analyzer: AnalyzerConfig = field(default_factory=AnalyzerConfig)
    env: EnvLoopConfig = field(default_factory=EnvLoopConfig)
    # verl's replay buffer polls TransferQueue for finished rollouts every 2 s; a floor on every step of small runs
    replay_poll_interval_s: float = 0.05
    dump_dir: Optional[str] = None  # write sampled trajectories with per-token values (the viewer's input)
    dump_rows: int = 8  # trajectories dumped per step
    # actions: the policy-gradient advantage is zeroed outside action tokens, so reasoning and format tokens get no
    # policy-gradient update; all: verl's behaviour
    advantage_tokens: str = "all"
    # stop training after the first validation with hindsight/val_success >= this; null: train for
    # trainer.total_training_steps
    stop_at_val_success: Optional[float] = None

    def __post_init__(self):
        _check_choice("hindsight.advantage_tokens", self.advantage_tokens, ("all", "actions"))
        if self.replay_poll_interval_s <= 0:
            raise ValueError(f"hindsight.replay_poll_interval_s must be > 0, got {self.replay_poll_interval_s}")
        if self.dump_rows < 1:
            raise ValueError(f"hindsight.dump_rows must be >= 1, got {self.dump_rows}")
        if self.stop_at_val_success is not None and not 0.0 < self.stop_at_val_success <= 1.0:
            raise ValueError(f"hindsight.stop_at_val_success must be in (0, 1] or null, got "
                             f"{self.stop_at_val_success}")

    def validate(self, config: Any) -> None:
        """Combinations with the rest of the run's config that would silently do nothing, or something else than
        asked, fail here with the fix."""
        estimator = str(_get(config, "algorithm", "adv_estimator", default=""))
        if self.stop_at_val_success is not None:
            test_freq = _get(config, "trainer", "test_freq", default=-1)
            if test_freq is None or int(test_freq) <= 0:
                raise ValueError("hindsight.stop_at_val_success needs validation during training: set "
                                 f"trainer.test_freq > 0 (got {test_freq})")
        if estimator == "serl" and not self.enable:
            raise ValueError("algorithm.adv_estimator=serl needs the hindsight stage: set hindsight.enable=true "
                             "(and trainer.v1.trainer_mode=hindsight); see recipes/serl.yaml")
        if self.distill.enabled and not self.enable:
            raise ValueError("hindsight.distill.coef > 0 needs the hindsight stage: set hindsight.enable=true")
        if self.enable and estimator != "serl" and not self.distill.enabled:
            raise ValueError("hindsight.enable=true but nothing uses the teacher: set algorithm.adv_estimator=serl "
                             "(SERL) or hindsight.distill.coef > 0 (HINT-SD, HERO)")
        if self.enable:
            self._validate_engine(config)
        self._validate_token_budgets(config)
        if self.distill.enabled and self.distill.divergence == "topk_tail":
            if estimator == "serl":
                raise ValueError("algorithm.adv_estimator=serl with hindsight.distill.divergence=topk_tail: SERL's "
                                 "weights need the teacher's log-prob of every sampled token, the top-k teacher pass "
                                 "keeps only its k most likely tokens; use divergence=k1, k3 or jsd with SERL")
            if bool(_get(config, "actor_rollout_ref", "model", "use_fused_kernels", default=False)):
                raise ValueError("hindsight.distill.divergence=topk_tail with actor_rollout_ref.model."
                                 "use_fused_kernels=true: the top-k + tail loss and the teacher's top-k pass run on "
                                 "full logits, which verl's fused kernels never materialize (both would be skipped); "
                                 "set use_fused_kernels=false or divergence=k1, k3 or jsd")
        sources = self.feedback.sources
        if "analyzer" in sources and self.analyzer.role != "analyzer":
            raise ValueError("hindsight.feedback.source=analyzer needs hindsight.analyzer.role=analyzer")
        if "reflection" in sources and self.analyzer.role != "reflector":
            raise ValueError("hindsight.feedback.source=reflection needs hindsight.analyzer.role=reflector")
        if "judge" in sources and self.analyzer.role != "judge":
            raise ValueError("hindsight.feedback.source=judge needs hindsight.analyzer.role=judge (the agent loop "
                             "asks the judge at the end of each episode)")
        if self.targets.uses_analyzer and self.analyzer.role != "analyzer":
            raise ValueError(f"hindsight.targets.turns={self.targets.turns} needs hindsight.analyzer.role=analyzer")
        readers = {"analyzer": "analyzer" in sources or self.targets.uses_analyzer, "reflector": "reflection" in sources,
                   "judge": "judge" in sources}
        if self.enable and self.analyzer.role != "none" and not readers[self.analyzer.role]:
            reader = {"analyzer": "analyzer (or hindsight.targets.turns=analyzer_*)", "reflector": "reflection",
                      "judge": "judge"}[self.analyzer.role]
            raise ValueError(f"hindsight.analyzer.role={self.analyzer.role} asks a model about every episode but "
                             f"nothing reads its answer: add {reader} to hindsight.feedback.source, or set "
                             "hindsight.analyzer.role=none")
        if self.enable and lora_enabled(config):
            self._validate_lora(config)
        if estimator == "serl":
            serl = load_serl_config(_get(config, "algorithm", default=None))
            if self.env.history_turns is not None and serl.base_estimator not in MULTI_ROW_BASE_ESTIMATORS:
                raise ValueError(f"algorithm.serl.base_estimator={serl.base_estimator} with hindsight.env.history_turns"
                                 f"={self.env.history_turns}: an episode spans several rows and verl's V1 trainer "
                                 f"broadcasts the advantage over them only for {MULTI_ROW_BASE_ESTIMATORS}; use one of "
                                 "those or history_turns=null")


    def _validate_engine(self, config: Any) -> None:
        """Off the FSDP engines (verl's Megatron engine), refuse what needs FSDP internals, naming what remains.

        A moving teacher keeps and updates its weights shard by shard through ``named_parameters()`` of one
        module (Megatron keeps a list of model chunks); ``topk_tail`` runs in the logits hook, where Megatron's
        logits are vocab-sharded and arrive with a ``data_format`` argument. What remains (a frozen or live teacher
        scored by the reference/actor forward, sampled-token divergences, SERL) uses only verl's engine-agnostic
        worker calls and loss signature; it has not run on Megatron.
        """
        strategy = str(_get(config, "actor_rollout_ref", "actor", "strategy", default="fsdp"))
        if strategy in ("fsdp", "fsdp2"):
            return
        unsupported = []
        if self.teacher.moves:
            unsupported.append(f"hindsight.teacher.kind={self.teacher.kind}")
        if self.distill.enabled and self.distill.divergence == "topk_tail":
            unsupported.append("hindsight.distill.divergence=topk_tail")
        if unsupported:
            raise ValueError(f"actor_rollout_ref.actor.strategy={strategy} is not supported with "
                             f"{' and '.join(unsupported)} (they need the FSDP engine's parameters and logits hook); "
                             f"on {strategy} use hindsight.teacher.kind=frozen or live with hindsight.distill."
                             "divergence=k1, k3 or jsd, or set actor_rollout_ref.actor.strategy=fsdp2")

    def _validate_token_budgets(self, config: Any) -> None:
        """With dynamic batch sizes each micro-batch holds at most ``max_token_len_per_gpu x Ulysses SP`` tokens;
        verl asserts that every row fits only when it splits the first batch. A training row is at most prompt +
        response tokens; a teacher sequence (scored by the reference or the actor log-prob pass) at most
        ``hindsight.teacher.max_length``, which defaults to the same sum."""
        prompt = _get(config, "data", "max_prompt_length", default=None)
        response = _get(config, "data", "max_response_length", default=None)
        if prompt is None or response is None:
            return
        row = int(prompt) + int(response)
        scored = max(row, int(self.teacher.max_length or 0)) if self.enable else row
        arr = _get(config, "actor_rollout_ref", default={})
        actor_sp = int(_get(arr, "actor", "ulysses_sequence_parallel_size", default=1) or 1)
        actor_dynamic = bool(_get(arr, "actor", "use_dynamic_bsz", default=False))
        budgets = (
            ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu", actor_dynamic,
             _get(arr, "actor", "ppo_max_token_len_per_gpu"), actor_sp, row, "training rows"),
            ("actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",
             bool(_get(arr, "rollout", "log_prob_use_dynamic_bsz", default=actor_dynamic)),
             _get(arr, "rollout", "log_prob_max_token_len_per_gpu"), actor_sp, scored, "log-prob rows"),
            ("actor_rollout_ref.ref.log_prob_max_token_len_per_gpu",
             bool(_get(arr, "ref", "log_prob_use_dynamic_bsz", default=actor_dynamic)),
             _get(arr, "ref", "log_prob_max_token_len_per_gpu"),
             int(_get(arr, "ref", "ulysses_sequence_parallel_size", default=actor_sp) or 1), scored, "log-prob rows"),
        )
        for key, dynamic, budget, sp, need, what in budgets:
            if not dynamic or budget is None or int(budget) * sp >= need:
                continue
            longest = (f"prompt {prompt} + response {response}" if need == row else
                       f"hindsight.teacher.max_length={self.teacher.max_length}")
            raise ValueError(f"{key}={budget} (x Ulysses SP {sp}) is below the longest of its {what} ({longest} = "
                             f"{need} tokens): a dynamic micro-batch must hold one whole row; set {key} >= "
                             f"{-(-need // sp)}")

    def _validate_lora(self, config: Any) -> None:
        """What LoRA changes: verl's reference is the base with the adapter off, a moving teacher is a second adapter
        (:mod:`verl_hindsight.trainer.teacher_weights`), and the ``hf`` rollout takes merged weights only."""
        if self.teacher.moves and self.teacher.kl_anchor == "teacher" and kl_to_reference(config):
            raise ValueError(f"hindsight.teacher.kl_anchor=teacher with LoRA and a {self.teacher.kind} teacher: verl "
                             "scores the KL reference as the base model with the adapter off, so it cannot follow "
                             "the teacher adapter; use hindsight.teacher.kl_anchor=initial (the base stays the anchor)")
        rollout = str(_get(config, "actor_rollout_ref", "rollout", "name", default=""))
        if rollout == "hf" and not _get(config, "actor_rollout_ref", "model", "lora", "merge", default=False):
            raise ValueError("actor_rollout_ref.rollout.name=hf with LoRA serves merged weights only: set "
                             "actor_rollout_ref.model.lora.merge=true")


@dataclass
class SERLConfig(BaseConfig):
    """``algorithm.serl``: SERL's advantage step on a verl estimator's advantage (:mod:`verl_hindsight.algo.serl`),
    with the released credit rule or a signed one."""

    # credit_rule values (not a field: no annotation)
    CREDIT_RULES = ("serl", "rlsd", "additive")

    base_estimator: str = "grpo"  # the verl estimator whose advantage is reweighted
    # serl: the released clipped weight | rlsd: the same weight unclipped | additive: A + additive_beta * d (the sign
    # can flip). Formulas and sources: verl_hindsight/algo/serl.py, docs/methods.md
    credit_rule: str = "serl"
    weight_clip: float = 0.2  # credit_rule=serl: w clipped to [1 - weight_clip, 1 + weight_clip]; 1.0: [0, 2]
    mixing_lambda: float = 0.5
    lambda_decay_steps: Optional[int] = 50  # lambda reaches 0 after this many updates; null: constant lambda
    additive_beta: float = 1.0  # credit_rule=additive: scale of the teacher-student gap added to A

    def __post_init__(self):
        _check_choice("algorithm.serl.base_estimator", self.base_estimator, SERL_BASE_ESTIMATORS)
        _check_choice("algorithm.serl.credit_rule", self.credit_rule, self.CREDIT_RULES)
        if not 0.0 <= self.weight_clip <= 1.0:
            raise ValueError(f"algorithm.serl.weight_clip must be in [0, 1] (1.0 clips the weight to [0, 2]), got "
                             f"{self.weight_clip!r}")
        if not 0.0 <= self.mixing_lambda <= 1.0:
            raise ValueError(f"algorithm.serl.mixing_lambda must be in [0, 1], got {self.mixing_lambda!r}")
        if self.lambda_decay_steps is not None and self.lambda_decay_steps < 1:
            raise ValueError(f"algorithm.serl.lambda_decay_steps must be >= 1, or null for a constant lambda, got "
                             f"{self.lambda_decay_steps!r}")
        if self.additive_beta <= 0:
            raise ValueError(f"algorithm.serl.additive_beta must be > 0, got {self.additive_beta!r}")
        # a rule's own key set under another rule would silently do nothing
        for key, rule in (("weight_clip", "serl"), ("additive_beta", "additive")):
            if self.credit_rule != rule and getattr(self, key) != SERLConfig.__dataclass_fields__[key].default:
                raise ValueError(f"algorithm.serl.{key} applies to credit_rule={rule} only, and credit_rule="
                                 f"{self.credit_rule}: drop the {key} setting or set credit_rule={rule}")

    def mixing(self, updates_done: int) -> float:
        """l_k: mixing_lambda decaying linearly to 0 at ``lambda_decay_steps`` policy updates (constant when null)."""
        if self.lambda_decay_steps is None:
            return self.mixing_lambda
        return self.mixing_lambda * max(0.0, 1.0 - float(updates_done) / float(self.lambda_decay_steps))


def _get(config: Any, *keys: str, default: Any = None) -> Any:
    """``config[k1][k2]...`` for DictConfigs, dicts and dataclass configs; ``default`` when any level is missing."""
    node = config
    for key in keys:
        if node is None:
            return default
        node = node.get(key, None) if hasattr(node, "get") else getattr(node, key, None)
    return default if node is None else node


def lora_enabled(config: Any) -> bool:
    """Whether verl trains a LoRA adapter, by verl's own rule (``trainer_base``: ``model.lora.rank`` or
    ``model.lora_rank`` > 0, or a ``lora_adapter_path``): verl then keeps the reference model inside the actor as
    the base with the adapter switched off (``ref_in_actor``)."""
    model = _get(config, "actor_rollout_ref", "model", default={})
    rank = _get(model, "lora", "rank", default=0) or 0
    if rank <= 0:
        rank = _get(model, "lora_rank", default=0) or 0
    return rank > 0 or _get(model, "lora_adapter_path") is not None


def kl_to_reference(config: Any) -> bool:
    """Whether the run has a KL to the reference model (the anchor a moving teacher must not drag along)."""
    return bool(_get(config, "actor_rollout_ref", "actor", "use_kl_loss", default=False)) or \
        bool(_get(config, "algorithm", "use_kl_in_reward", default=False))


def _to_dataclass(block: Any, cls: type, name: str):
    from omegaconf.errors import OmegaConfBaseException
    from verl.utils.config import omega_conf_to_dataclass

    if block is None:
        return cls()
    if isinstance(block, cls):
        return block
    try:
        return omega_conf_to_dataclass(block, cls)
    except OmegaConfBaseException as exc:
        # OmegaConf names the offending key relative to the block: give its full name
        key = f"{name}.{exc.full_key}" if getattr(exc, "full_key", None) else name
        raise ValueError(f"{key}: {str(exc).splitlines()[0]} (every key and its default: "
                         "recipes/hindsight_defaults.yaml)") from None


def settings_needing_the_trainer(settings: HindsightConfig) -> list[str]:
    """``key=value`` of every ``hindsight`` setting that differs from its default and that only the plugin's trainer
    applies: all of them but ``hindsight.env.*``, which the agent loops read themselves."""
    asked: list[str] = []

    def walk(value: Any, default: Any, key: str) -> None:
        if is_dataclass(value):
            for f in fields(value):
                if not f.name.startswith("_"):
                    walk(getattr(value, f.name), getattr(default, f.name), f"{key}.{f.name}")
        elif value != default:
            asked.append(f"{key}={value}")

    defaults = HindsightConfig()
    for f in fields(settings):
        if not f.name.startswith("_") and f.name != "env":
            walk(getattr(settings, f.name), getattr(defaults, f.name), f"{SECTION}.{f.name}")
    return asked


FLASH_ATTENTION_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def check_attention_backend(config: Any, find_spec: Any = None) -> None:
    """Refuse, before any worker loads the model, a GPU run whose attention needs a package that is not installed.

    verl asks transformers for ``flash_attention_2`` unless ``model.override_config.attn_implementation`` says
    otherwise; ``pip install ".[vllm]"`` brings no flash-attn (it builds against the local CUDA toolkit), and
    without it transformers falls back to its ``kernels`` hub download or raises in every worker. The CPU runtime
    swaps in SDPA itself, so CPU runs are not checked.
    """
    import importlib.util

    find_spec = find_spec or importlib.util.find_spec
    if str(_get(config, "trainer", "device", default="cuda")) == "cpu":
        return
    asked = _get(config, "actor_rollout_ref", "model", "override_config", "attn_implementation")
    impl = str(asked or "flash_attention_2")
    module = FLASH_ATTENTION_MODULES.get(impl)
    if module is None or find_spec(module) is not None or find_spec("kernels") is not None:
        return
    source = "" if asked else " (verl's default: the key is unset)"
    raise ValueError(f"actor_rollout_ref.model.override_config.attn_implementation={impl}{source} needs the "
                     f"{module} module, which is not installed: install it (flash-attn, built for this "
                     "CUDA/torch) or set actor_rollout_ref.model.override_config.attn_implementation=sdpa (the GPU "
                     "recipes' setting)")


def check_trainer_mode(config: Any, settings: Optional[HindsightConfig] = None) -> None:
    """Refuse a run whose ``hindsight`` settings would be ignored: verl's own trainers never read the block, so
    without ``trainer.v1.trainer_mode=hindsight`` HINT-SD or HERO would silently train as plain GRPO."""
    mode = str(_get(config, "trainer", "v1", "trainer_mode", default="sync"))
    if mode == TRAINER_MODE:
        return
    asked = settings_needing_the_trainer(settings if settings is not None else
                                         load_hindsight_config(config, validate=False))
    if str(_get(config, "algorithm", "adv_estimator", default="")) == "serl":
        asked.insert(0, "algorithm.adv_estimator=serl")
    if asked:
        raise ValueError(f"{', '.join(asked)}: only the plugin's trainer applies these, and "
                         f"trainer.v1.trainer_mode={mode}; set trainer.v1.trainer_mode={TRAINER_MODE} (or drop the "
                         "hindsight settings)")


def load_hindsight_config(config: Any, validate: bool = True) -> HindsightConfig:
    """The run's ``hindsight`` block as a :class:`HindsightConfig` (defaults where the block or a key is absent);
    with ``validate``, also checks it against the rest of ``config``."""
    settings = _to_dataclass(_get(config, SECTION), HindsightConfig, SECTION)
    if validate:
        settings.validate(config)
    return settings


def load_serl_config(algorithm: Any) -> SERLConfig:
    """``algorithm.serl`` as a :class:`SERLConfig` (defaults where absent)."""
    return _to_dataclass(_get(algorithm, "serl"), SERLConfig, "algorithm.serl")


def load_env_loop_config(config: Any, overrides: Optional[dict[str, Any]] = None) -> EnvLoopConfig:
    """``hindsight.env`` with an agent loop's own overrides (its ``agent_loop_config_path`` entry) on top; override
    keys that are not env-loop settings belong to the loop's other arguments and are ignored here."""
    from omegaconf import OmegaConf

    block = _get(config, SECTION, "env")
    merged = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else dict(block or {})
    names = set(EnvLoopConfig.__dataclass_fields__) - {"_target_"}
    merged.update({k: v for k, v in (overrides or {}).items() if k in names})
    return _to_dataclass(merged, EnvLoopConfig, "hindsight.env")
