"""``trainer.v1.trainer_mode=hindsight``: verl's synchronous V1 trainer plus the hindsight stages.

Behaves exactly like verl's ``sync`` trainer otherwise (it *is* ``PPOTrainerSync``, pinned to sync mode).
The data flow of one step, with what this class adds in brackets::

    rollout -> reward -> old log-probs [-> hindsight stage: feedback, targets, teacher log-probs]
            -> ref -> advantage [SERL reweighting] -> actor update [distillation term; EMA/lagged teacher update]

- the hindsight stage (``hindsight.enable``, :mod:`verl_hindsight.hindsight.stage`) writes ``teacher_log_probs``
  (fp32) and ``hindsight_mask`` next to ``old_log_probs`` in TransferQueue, and logs ``hindsight/*`` metrics;
- ``algorithm.adv_estimator=serl``: verl's GRPO advantage (with its multi-row session broadcast and rollout
  correction untouched) reweighted on hindsight tokens (:mod:`verl_hindsight.algo.serl`);
- ``hindsight.distill.coef > 0``: the actor loss gains the masked divergence (:mod:`verl_hindsight.algo.loss`),
  installed with verl's ``set_loss_fn``;
- ``hindsight.teacher.kind`` frozen/ema/lagged: the teacher is scored by the worker's reference model
  (:mod:`.teacher_worker`), updated after each actor update and saved with verl's checkpoints; a moving teacher
  in a run with a KL to the reference keeps its weights in a copy swapped in for the teacher pass only, so the KL
  anchor stays on the initial policy (``hindsight.teacher.kl_anchor``);
- rollout accounting: after each rollout it reads the agent loops' per-turn records and action masks from
  TransferQueue and logs ``hindsight/*`` metrics (environment success, failures by reason, invalid actions,
  turns, action-token fraction) and checks that action masks never cover observation tokens;
- a responsive replay buffer: verl polls TransferQueue for finished rollouts every 2 s, a floor on every step
  that dominates small (CPU) runs; ``hindsight.replay_poll_interval_s`` (default 0.05) lowers it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from verl_hindsight.trainer import batch_io as io
from verl_hindsight.trainer.teacher_weights import TeacherWeights

logger = logging.getLogger(__name__)

TRAINER_MODE = "hindsight"
DEFAULT_POLL_INTERVAL_S = 0.05


def rollout_record_metrics(action_masks, response_masks, extra_fields: list[dict],
                           is_padding: list[bool] | None = None) -> dict[str, float]:
    """``hindsight/*`` metrics of one training batch (pure function; unit-tested).

    ``is_padding`` marks the synthetic rows verl appends to make the batch divisible by the data-parallel size;
    they copy a real row's extra fields and are left out.
    """
    keep = [not p for p in is_padding] if is_padding is not None else [True] * len(extra_fields)
    extra_fields = [e for e, k in zip(extra_fields, keep) if k]
    if action_masks is not None:
        action_masks = [r for r, k in zip(io.rows(action_masks), keep) if k]
    response_masks = [r for r, k in zip(io.rows(response_masks), keep) if k]
    n = len(extra_fields)
    metrics: dict[str, float] = {"hindsight/rows": float(n)}
    with_turns = [e for e in extra_fields if isinstance(e, dict) and "hs_turns" in e]
    metrics["hindsight/rows_with_turn_records"] = len(with_turns) / max(n, 1)
    if action_masks is None:
        metrics["hindsight/rows_with_action_mask"] = 0.0
        return metrics
    action_tokens = response_tokens = leaked = 0
    for am, rm in zip(action_masks, response_masks):
        am, rm = am.long(), rm.long()
        action_tokens += int(am.sum())
        response_tokens += int(rm.sum())
        leaked += int((am * (1 - rm)).sum())
    metrics["hindsight/rows_with_action_mask"] = 1.0
    metrics["hindsight/action_token_frac"] = action_tokens / max(response_tokens, 1)
    metrics["hindsight/action_tokens_on_observation"] = float(leaked)
    # one summary per episode: in history mode an episode spans several rows, only its last row counts
    envs = [e["hs_env"] for e in with_turns if "hs_env" in e and e.get("hs_last_row", True)]
    if envs:
        metrics["hindsight/env_success"] = sum(bool(e["success"]) for e in envs) / len(envs)
        metrics["hindsight/env_return"] = sum(float(e["return"]) for e in envs) / len(envs)
        metrics["hindsight/turns_mean"] = sum(int(e["turns"]) for e in envs) / len(envs)
        turns = sum(int(e["turns"]) for e in envs)
        metrics["hindsight/invalid_action_rate"] = sum(int(e["invalid_actions"]) for e in envs) / max(turns, 1)
        for reason in ("response_length", "max_turns"):
            metrics[f"hindsight/episode_cut/{reason}"] = sum(e.get("cut") == reason for e in envs) / len(envs)
        _warn_budget_cuts(metrics["hindsight/episode_cut/response_length"])
        failures = Counter(e["failure"] for e in envs if e.get("failure"))
        metrics["hindsight/env_failures"] = float(sum(failures.values()))
        for reason, count in failures.items():
            metrics[f"hindsight/env_failure/{reason}"] = float(count)
    return metrics


_budget_warned = False


def _warn_budget_cuts(fraction: float) -> None:
    """Say once per process when episodes run out of response tokens: their return holds only the steps taken,
    so a budget too small for a whole episode silently caps success (the toy corridor once needed 104 tokens for
    four doors and had 96)."""
    global _budget_warned
    if fraction > 0 and not _budget_warned:
        _budget_warned = True
        logger.warning("%.0f%% of this step's episodes ended because the response ran out of tokens before the "
                       "environment ended them (hindsight/episode_cut/response_length); their return counts only "
                       "the steps taken. Raise data.max_response_length (or lower hindsight.env.max_turns) if "
                       "whole episodes should fit.", 100 * fraction)


@contextmanager
def _verl_estimator(config, name: str):
    """verl's advantage step reads the estimator's name from ``algorithm.adv_estimator``; SERL's base advantage is
    that step run with the base estimator (KL-in-reward, rollout correction and the multi-row GRPO broadcast
    included), so the name is the base estimator's for its duration."""
    from omegaconf import open_dict

    original = config.algorithm.adv_estimator
    with open_dict(config):
        config.algorithm.adv_estimator = name
    try:
        yield
    finally:
        with open_dict(config):
            config.algorithm.adv_estimator = original


@register_trainer(TRAINER_MODE)
class HindsightTrainer(PPOTrainerSync):
    def __init__(self, config):
        from verl_hindsight.config import load_hindsight_config, load_serl_config
        from verl_hindsight.hindsight.feedback import needs_judge

        # validated before any worker starts: a wrong config fails in seconds, not after model loading
        self.hs = load_hindsight_config(config)
        needs_judge(self.hs.feedback.source)  # unknown feedback source names fail here
        self.serl = None
        if str(config.algorithm.adv_estimator) == "serl":
            self.serl = load_serl_config(config.algorithm)
        kl_to_reference = bool(config.actor_rollout_ref.actor.get("use_kl_loss", False)) or \
            bool(config.algorithm.get("use_kl_in_reward", False))
        self.teacher_weights = TeacherWeights(self.hs.teacher, self.hs.enable, kl_to_reference)
        self._hs_num_targets = 0
        self._hs_num_rows = 0
        super().__init__(config)

    # ------------------------------------------------------------------ construction
    def _build_replay_buffer(self):
        # verl branches on `trainer_mode == "sync"` in several places; this trainer is sync in all of them.
        self.trainer_mode = "sync"
        self.parameter_sync_step = self.config.trainer.v1.get("sync", {}).get("parameter_sync_step", 1)
        replay_buffer = super()._build_replay_buffer()
        replay_buffer.poll_interval = float(self.hs.replay_poll_interval_s)
        return replay_buffer

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if not self.hs.enable:
            return
        import ray
        from verl.trainer.ppo.utils import Role

        from verl_hindsight.trainer.teacher_worker import HindsightActorRolloutRefWorker

        if Role.Actor in self.role_worker_mapping:
            raise ValueError("the hindsight stage needs verl's hybrid actor/rollout worker (it scores teachers and "
                             "installs the distillation loss there); standalone rollout replicas are not supported")
        lora = self.config.actor_rollout_ref.model.get("lora", {}).get("rank", 0) or \
            self.config.actor_rollout_ref.model.get("lora_rank", 0)
        if lora and self.hs.teacher.moves:
            raise ValueError(f"hindsight.teacher.kind={self.hs.teacher.kind} is not supported with LoRA (the "
                             "reference model is the adapter-free base); use kind=frozen or kind=live")
        # frozen/ema/lagged teachers are the worker's reference model: make sure the worker builds one
        role = Role.ActorRolloutRef if Role.ActorRolloutRef in self.role_worker_mapping else Role.ActorRollout
        if self.hs.teacher.uses_reference_model and not lora and role == Role.ActorRollout:
            del self.role_worker_mapping[Role.ActorRollout]
            self.mapping[Role.ActorRolloutRef] = self.mapping.pop(Role.ActorRollout)
            role = Role.ActorRolloutRef
        self.role_worker_mapping[role] = ray.remote(HindsightActorRolloutRefWorker)

    def on_init_end(self):
        super().on_init_end()
        if self.hs.distill.enabled:
            self.actor_rollout_wg.hs_install_distill_loss(self.hs.distill)
        self.teacher_weights.ensure_copy(self.actor_rollout_wg)
        if self.teacher_weights.moving and self.hs.teacher.kl_anchor == "teacher" and self._kl_to_reference:
            logger.warning("hindsight: kl_anchor=teacher: the KL to the reference follows the %s teacher, so it no "
                           "longer holds the policy near its start (hindsight.teacher.kl_anchor=initial keeps it "
                           "there)", self.hs.teacher.kind)

    @property
    def _kl_to_reference(self) -> bool:
        return bool(self.config.actor_rollout_ref.actor.get("use_kl_loss", False)) or \
            bool(self.config.algorithm.get("use_kl_in_reward", False))

    # ------------------------------------------------------------------ step
    def _compute_old_log_prob(self, batch, metrics: dict):
        batch = super()._compute_old_log_prob(batch, metrics)
        metrics.update(self._rollout_record_metrics(batch))
        if self.hs.enable:
            import time

            start = time.perf_counter()
            metrics.update(self._hindsight_stage(batch))
            metrics["timing_s/hindsight_stage"] = time.perf_counter() - start
        return batch

    @property
    def updates_done(self) -> int:
        """Policy updates completed before this step (verl's global_steps starts at 1): SERL's ``k``."""
        return max(0, self.global_steps - 1)

    def _stage_active(self) -> bool:
        """Whether anything consumes teacher log-probs this step (SERL's lambda or the distillation coef > 0)."""
        serl_on = self.serl is not None and self.serl.mixing(self.updates_done) > 0
        return serl_on or self.hs.distill.coef_at(self.updates_done) > 0

    def _teacher_pass(self, topk: bool = False):
        """The worker method that scores teacher sequences, and the scorer's keyword arguments.

        frozen/EMA/lagged teachers are the reference model (``compute_ref_log_prob``; with LoRA the adapter-free
        actor), the live one is the actor; ``topk`` picks the hindsight worker's top-k variant of the same pass.
        """
        arr = self.config.actor_rollout_ref
        on_ref = self.hs.teacher.uses_reference_model and not self.ref_in_actor
        block = arr.ref if on_ref else arr.rollout
        micro = None if block.get("log_prob_use_dynamic_bsz", False) else block.get("log_prob_micro_batch_size_per_gpu")
        extra = {"no_lora_adapter": True} if self.hs.teacher.uses_reference_model and not on_ref else None
        wg = self.actor_rollout_wg
        if topk:
            call = wg.hs_compute_ref_topk if on_ref else wg.hs_compute_actor_topk
        else:
            call = wg.compute_ref_log_prob if on_ref else wg.compute_log_prob
        return call, dict(temperature=arr.rollout.temperature, dp_size=wg.world_size, micro_batch_size=micro,
                          extra_meta=extra)

    def _teacher_scorer(self):
        from verl_hindsight.trainer.teacher_pass import worker_scorer

        call, kwargs = self._teacher_pass()
        return worker_scorer(call, **kwargs)

    def _teacher_topk_scorer(self):
        """The teacher's top-k through the same worker passes as :meth:`_teacher_scorer` (``topk_tail`` loss)."""
        from verl_hindsight.trainer.teacher_pass import worker_topk_scorer

        call, kwargs = self._teacher_pass(topk=True)
        return worker_topk_scorer(call, k=self.hs.distill.topk, **kwargs)

    @property
    def _uses_topk(self) -> bool:
        return self.hs.distill.enabled and self.hs.distill.divergence == "topk_tail"

    def _renderer(self):
        if getattr(self, "_hs_renderer", None) is None:
            from verl.utils import hf_tokenizer

            from verl_hindsight.hindsight.teacher_sequences import FeedbackRenderer

            tokenizer = hf_tokenizer(self.config.actor_rollout_ref.model.path,
                                     trust_remote_code=self.config.data.get("trust_remote_code", False))
            self._hs_renderer = FeedbackRenderer(tokenizer, self.hs.teacher.feedback_template)
        return self._hs_renderer

    def _hindsight_stage(self, batch) -> dict[str, float]:
        import torch

        from verl_hindsight.agent_loops.hindsight_answers import answer_metrics
        from verl_hindsight.hindsight.stage import Row, run_stage

        fields = ["prompts", "responses", "response_mask", "action_mask", "old_log_probs", "extra_fields", "uid"]
        data = io.get(batch, fields)
        extra, uids, padding = io.objects(data, "extra_fields"), io.objects(data, "uid"), io.is_padding(batch)
        rows = [
            Row(uid=str(uid), prompt_ids=p.tolist(), response_ids=r.tolist(), action_mask=a.tolist(),
                extra_fields=e if isinstance(e, dict) else {}, old_log_probs=o.float().tolist(), is_padding=pad,
                response_mask=m.tolist())
            for uid, p, r, a, o, e, pad, m in zip(uids, io.rows(data["prompts"]), io.rows(data["responses"]),
                                                  io.rows(data["action_mask"]), io.rows(data["old_log_probs"]), extra,
                                                  padding, io.rows(data["response_mask"]))
        ]
        metrics = answer_metrics([e for e, pad in zip(extra, padding) if not pad])
        teacher = self.hs.teacher
        if teacher.max_length is None:
            rollout = self.config.actor_rollout_ref.rollout
            teacher = dataclasses.replace(teacher, max_length=int(rollout.prompt_length + rollout.response_length))
        if self._stage_active():
            scorers = ({"topk_scorer": self._teacher_topk_scorer(), "topk": self.hs.distill.topk} if self._uses_topk
                       else {"scorer": self._teacher_scorer()})
            with self.teacher_weights.in_reference(self.actor_rollout_wg):
                result = run_stage(rows, feedback_config=self.hs.feedback, target_config=self.hs.targets,
                                   teacher_config=teacher, renderer=self._renderer(), **scorers)
            teacher_rows, mask_rows = result.teacher_log_probs, result.hindsight_mask
            topk_rows = result.teacher_topk
            metrics.update(result.metrics)
            self._hs_feedback = result.inserted_feedback
            metrics["hindsight/stage_active"] = 1.0
        else:
            # lambda and coef are 0: nothing reads the teacher, so it is not run ("decay into the base estimator")
            teacher_rows = [[0.0] * len(r.response_ids) for r in rows]
            mask_rows = [[0] * len(r.response_ids) for r in rows]
            topk_rows = None
            metrics["hindsight/stage_active"] = 0.0
            metrics["hindsight/targeted_token_frac_of_response"] = 0.0
            self._hs_feedback = {}
        if teacher.log_probe:
            metrics.update(self._probe_metrics())
        self._hs_num_targets = int(sum(map(sum, mask_rows)))
        self._hs_num_rows = len(rows)
        columns = {"teacher_log_probs": io.jagged(teacher_rows, torch.float32),
                   "hindsight_mask": io.jagged(mask_rows, torch.int64)}
        if self._uses_topk:
            from verl_hindsight.algo.topk_distill import TEACHER_TOPK_IDS, TEACHER_TOPK_LOG_PROBS
            from verl_hindsight.hindsight.teacher_sequences import empty_topk

            k = self.hs.distill.topk
            if topk_rows is None:  # stage inactive: the student's top-k hook still reads the columns
                topk_rows = [empty_topk(len(r.response_ids), k) for r in rows]
            columns[TEACHER_TOPK_IDS] = torch.nested.as_nested_tensor([i for i, _ in topk_rows], layout=torch.jagged)
            columns[TEACHER_TOPK_LOG_PROBS] = torch.nested.as_nested_tensor([lp for _, lp in topk_rows],
                                                                            layout=torch.jagged)
        io.put(batch, columns)
        return metrics

    def _probe_metrics(self) -> dict[str, float]:
        """``hindsight.teacher.log_probe``: a fixed token sequence scored by the teacher, and by the KL anchor."""
        probe = list(range(3, 35))
        metrics = {}
        with self.teacher_weights.in_reference(self.actor_rollout_wg):
            metrics["hindsight/teacher_probe_logprob"] = float(sum(self._teacher_scorer()([probe])[0]))
        if self.hs.teacher.uses_reference_model and not self.ref_in_actor:
            # constant unless the anchor moves (kl_anchor=teacher)
            metrics["hindsight/reference_probe_logprob"] = float(sum(self._teacher_scorer()([probe])[0]))
        return metrics

    def _compute_advantage(self, batch, metrics: dict):
        if self.serl is not None:
            batch = self._serl_advantage(batch, metrics)
        else:
            batch = super()._compute_advantage(batch, metrics)
        if self.hs.advantage_tokens == "actions":
            batch = self._advantage_on_actions_only(batch)
        return batch

    def _advantage_on_actions_only(self, batch):
        """``hindsight.advantage_tokens=actions``: zero the advantage (and return) outside action tokens."""
        data = io.get(batch, ["advantages", "action_mask", "response_mask"])
        dense = data.to_padded_tensor()
        advantages = dense["advantages"] * dense["action_mask"].to(dense["advantages"].dtype)
        return io.put_response_columns(batch, {"advantages": advantages, "returns": advantages.clone()},
                                       data["response_mask"])

    def _serl_advantage(self, batch, metrics: dict):
        """``algorithm.adv_estimator=serl``: verl's advantage step with the base estimator, then the registered
        ``serl`` estimator (looked up in verl's registry) on its output and the stage's fields."""
        from verl.trainer.ppo.core_algos import get_adv_estimator_fn

        with _verl_estimator(self.config, self.serl.base_estimator):
            batch = super()._compute_advantage(batch, metrics)
        data = io.get(batch, ["advantages", "rm_scores", "teacher_log_probs", "old_log_probs", "hindsight_mask",
                              "response_mask", "uid"])
        index = np.array(io.objects(data, "uid"), dtype=object)
        dense = data.to_padded_tensor()
        base = dense["advantages"]
        estimator = get_adv_estimator_fn(self.config.algorithm.adv_estimator)
        advantages, returns = estimator(
            token_level_rewards=dense["rm_scores"], response_mask=dense["response_mask"], index=index,
            config=self.config.algorithm, teacher_log_probs=dense["teacher_log_probs"],
            old_log_probs=dense["old_log_probs"], hindsight_mask=dense["hindsight_mask"],
            updates_done=self.updates_done, base_advantages=base, metrics=metrics)
        self._hs_serl_factor = torch.where(base != 0, advantages / base, torch.ones_like(advantages))
        return io.put_response_columns(batch, {"advantages": advantages, "returns": returns}, data["response_mask"])

    def _update_actor(self, batch, metrics: dict):
        if self.hs.dump_dir:
            self._dump_trajectories(batch)
        if self.hs.enable:
            batch.extra_info.update({"hs_global_step": self.updates_done, "hs_num_targets": self._hs_num_targets,
                                     "hs_num_rows": self._hs_num_rows})
        batch = super()._update_actor(batch, metrics)
        metrics.update(self.teacher_weights.update(self.actor_rollout_wg, self.global_steps))
        return batch

    def _dump_trajectories(self, batch) -> None:
        """``hindsight.dump_dir``: sampled trajectories with per-token values, for the viewer (:mod:`.dump`)."""
        from verl_hindsight.trainer.dump import token_records, trajectory_record, write_step

        rows = [i for i, pad in enumerate(io.is_padding(batch)) if not pad][: self.hs.dump_rows]
        if not rows:
            return
        fields = ["prompts", "responses", "action_mask", "old_log_probs", "advantages", "extra_fields", "uid"]
        if self.hs.enable:
            fields += ["teacher_log_probs", "hindsight_mask"]
        data = io.get(batch, fields, keys=[batch.keys[i] for i in rows])
        extra, uids = io.objects(data, "extra_fields"), io.objects(data, "uid")
        tokenizer = self._renderer().tokenizer
        factor = getattr(self, "_hs_serl_factor", None) if self.serl is not None else None
        feedback = getattr(self, "_hs_feedback", {}) if self.hs.enable else {}
        columns = {name: io.rows(data[name]) for name in fields if name not in ("extra_fields", "uid")}
        records = []
        for k, row in enumerate(rows):
            response = columns["responses"][k].tolist()
            n = len(response)
            hmask = columns["hindsight_mask"][k].tolist() if self.hs.enable else [0] * n
            teacher = columns["teacher_log_probs"][k].float().tolist() if self.hs.enable else [0.0] * n
            tokens = token_records(tokenizer, response, columns["action_mask"][k].tolist(), hmask,
                                   columns["old_log_probs"][k].float().tolist(), teacher,
                                   columns["advantages"][k].float().tolist(),
                                   factor[row, :n].tolist() if factor is not None else None)
            prompt = tokenizer.decode(columns["prompts"][k].tolist(), skip_special_tokens=False)
            turn_feedback = {turn: text for (i, turn), text in feedback.items() if i == row}
            records.append(trajectory_record(self.global_steps, str(self.config.trainer.experiment_name),
                                             str(uids[k]), extra[k] if isinstance(extra[k], dict) else {}, prompt,
                                             tokens, turn_feedback))
        write_step(self.hs.dump_dir, self.global_steps, records)

    def _validate(self, *args, **kwargs):
        metrics = super()._validate(*args, **kwargs)
        if metrics:
            # one stable name for episode success on the validation set (the agent loops report it per sample)
            found = [v for k, v in metrics.items() if k.startswith("val-aux/") and k.endswith("/success/mean@1")]
            if found:
                metrics["hindsight/val_success"] = float(sum(found) / len(found))
                self._maybe_stop(metrics["hindsight/val_success"])
        return metrics

    def _maybe_stop(self, val_success: float) -> None:
        """``hindsight.stop_at_val_success``: make the step just validated the last one.

        verl's loop runs while ``global_steps <= total_training_steps`` and increments after logging, so lowering
        the total to the current step ends training after this step's metrics are written (a validation before
        training that already passes ends it after step 1)."""
        target = self.hs.stop_at_val_success
        if target is None or val_success < target:
            return
        stop = max(1, int(self.global_steps))
        if stop < self.total_training_steps:
            logger.warning("hindsight: validation success %.3f >= stop_at_val_success %.3f; stopping after step %d",
                           val_success, target, stop)
            self.total_training_steps = stop

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self):
        super()._save_checkpoint()
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        self.teacher_weights.save(self.actor_rollout_wg, folder, self.global_steps)

    def _load_checkpoint(self):
        super()._load_checkpoint()
        if self.global_steps == 0:
            return
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        if self.config.trainer.resume_mode == "resume_path":
            folder = self.config.trainer.resume_from_path
        self.teacher_weights.load(self.actor_rollout_wg, folder)

    # ------------------------------------------------------------------ accounting
    def _rollout_record_metrics(self, batch) -> dict[str, Any]:
        fields = ["response_mask", "extra_fields"]
        try:
            data = io.get(batch, fields + ["action_mask"])
            action_masks = data["action_mask"]
        except (KeyError, RuntimeError, ValueError) as exc:
            # Reported as hindsight/rows_with_action_mask = 0, and said once in the log.
            if not getattr(self, "_warned_no_action_mask", False):
                logger.warning("hindsight trainer: the batch has no action_mask (%s); use a verl-hindsight agent "
                               "loop (agent_name=hindsight_text_env) to record action spans", exc)
                self._warned_no_action_mask = True
            if self.hs.enable:
                raise RuntimeError("hindsight.enable=true needs action spans: use a verl-hindsight agent loop "
                                   "(hindsight_text_env / hindsight_tool_env)") from exc
            data = io.get(batch, fields)
            action_masks = None
        extra, padding = io.objects(data, "extra_fields"), io.is_padding(batch)
        metrics = rollout_record_metrics(action_masks, data["response_mask"], extra, padding)
        if metrics.get("hindsight/action_tokens_on_observation", 0) > 0:
            bad = [(key, am.tolist(), rm.tolist()) for key, am, rm, pad in
                   zip(batch.keys, io.rows(action_masks), io.rows(data["response_mask"]), padding)
                   if not pad and int((am * (1 - rm)).sum())]
            raise RuntimeError("hindsight trainer: action_mask covers observation tokens (response_mask 0); the agent "
                               f"loop's spans are wrong. First offending row (key, action_mask, response_mask): {bad[0]}")
        return metrics
