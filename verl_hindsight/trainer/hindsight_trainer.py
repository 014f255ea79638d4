"""``trainer.v1.trainer_mode=hindsight``: verl's synchronous V1 trainer plus the hindsight stages.

Behaves exactly like verl's ``sync`` trainer otherwise (it *is* ``PPOTrainerSync``, pinned to sync mode).
The data flow of one step, with what this class adds in brackets::

    rollout -> reward -> old log-probs [-> hindsight stage: feedback, targets, teacher log-probs]
            -> ref -> advantage [SERL reweighting] -> actor update [distillation term; EMA/lagged teacher update]

- the hindsight stage (``hindsight.enable``, :mod:`verl_hindsight.hindsight.stage`) writes the teacher's answer
  under verl's distillation names and layout (``teacher_logprobs`` / ``teacher_ids``: one row per prompt + response
  token, K columns) and ``hindsight_mask`` (response-aligned) next to ``old_log_probs`` in TransferQueue, and logs
  ``hindsight/*`` metrics;
- ``algorithm.adv_estimator=serl``: verl's advantage step run with ``algorithm.serl.base_estimator`` (KL in
  reward, rollout correction and the multi-row GRPO broadcast untouched), then the estimator verl's registry
  returns for ``serl`` (:func:`verl_hindsight.algo.serl.compute_serl_advantage`) reweights it on hindsight tokens;
- ``hindsight.distill.coef > 0``: the actor loss gains the masked divergence (:mod:`verl_hindsight.algo.loss`),
  installed with verl's ``set_loss_fn``;
- ``hindsight.teacher.kind`` frozen/ema/lagged: the teacher is scored by the worker's reference model
  (:mod:`.teacher_worker`), updated after each actor update and saved with verl's checkpoints
  (:mod:`.teacher_weights`);
- rollout accounting: after each rollout it reads the agent loops' per-turn records and action masks from
  TransferQueue and logs ``hindsight/*`` metrics (environment success, failures by reason, invalid actions,
  turns, action-token fraction) and checks that action masks never cover observation tokens.

Reads and writes of the batch in TransferQueue go through :mod:`.batch_io`.

``hindsight.replay_poll_interval_s`` sets how often verl's replay buffer polls TransferQueue for finished rollouts
(verl's 2 s is a floor on every step of a small run).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from contextlib import contextmanager

import numpy as np
import torch
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from verl_hindsight.config import TRAINER_MODE, kl_to_reference, lora_enabled
from verl_hindsight.trainer import batch_io as io
from verl_hindsight.trainer.rollout_metrics import batch_rollout_metrics
from verl_hindsight.trainer.teacher_weights import TeacherWeights

logger = logging.getLogger(__name__)



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
        from verl_hindsight.config import check_attention_backend, load_hindsight_config, load_serl_config
        from verl_hindsight.hindsight.feedback import get_feedback_source
        from verl_hindsight.runtime.cpu_platform import cpu_runtime_selected

        # validated before any worker starts: a wrong config fails in seconds, not after model loading
        self.hs = load_hindsight_config(config)
        if not cpu_runtime_selected():  # the CPU runtime runs every model on SDPA
            check_attention_backend(config)
        get_feedback_source(self.hs.feedback.source)  # unknown feedback source names fail here
        self.serl = None
        if str(config.algorithm.adv_estimator) == "serl":
            self.serl = load_serl_config(config.algorithm)
        self.teacher_weights = TeacherWeights(self.hs.teacher, self.hs.enable, kl_to_reference(config),
                                              lora=lora_enabled(config))
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
        lora = lora_enabled(self.config)  # verl sets its own ref_in_actor from the same rule after this method
        # frozen/ema/lagged teachers are the worker's reference model (under LoRA: the actor's base and a teacher
        # adapter): make sure the worker builds one
        role = Role.ActorRolloutRef if Role.ActorRolloutRef in self.role_worker_mapping else Role.ActorRollout
        if self.hs.teacher.uses_reference_model and not lora and role == Role.ActorRollout:
            del self.role_worker_mapping[Role.ActorRollout]
            self.mapping[Role.ActorRolloutRef] = self.mapping.pop(Role.ActorRollout)
            role = Role.ActorRolloutRef
        self.role_worker_mapping[role] = ray.remote(HindsightActorRolloutRefWorker)

    def on_init_end(self):
        super().on_init_end()
        if lora_enabled(self.config) != self.ref_in_actor:
            raise RuntimeError("verl's rule for keeping the reference inside the actor (ref_in_actor) no longer "
                               "matches verl_hindsight.config.lora_enabled; update it for this verl version")
        if self.hs.distill.enabled:
            self.actor_rollout_wg.hs_install_distill_loss(self.hs.distill)
        self.teacher_weights.ensure_copy(self.actor_rollout_wg)
        if self.teacher_weights.moving and self.hs.teacher.kl_anchor == "teacher" and kl_to_reference(self.config):
            logger.warning("hindsight: kl_anchor=teacher: the KL to the reference follows the %s teacher, so it no "
                           "longer holds the policy near its start (hindsight.teacher.kl_anchor=initial keeps it "
                           "there)", self.hs.teacher.kind)

    # ------------------------------------------------------------------ step
    def _compute_old_log_prob(self, batch, metrics: dict):
        batch = super()._compute_old_log_prob(batch, metrics)
        metrics.update(batch_rollout_metrics(batch, self.hs.enable))
        if self.hs.enable:
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

    def _teacher_scorer(self, topk: bool = False):
        """The teacher pass on the worker group (sampled-token log-probs, or with ``topk`` the teacher's top-k)."""
        from verl_hindsight.trainer.teacher_pass import teacher_scorer

        return teacher_scorer(self.config.actor_rollout_ref, self.hs.teacher, self.actor_rollout_wg,
                              ref_in_actor=self.ref_in_actor, topk=self.hs.distill.topk if topk else 0)

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
        from verl_hindsight.agent_loops.hindsight_answers import answer_metrics
        from verl_hindsight.hindsight.stage import Row, run_stage
        from verl_hindsight.hindsight.teacher_sequences import empty_row

        fields = ["prompts", "responses", "response_mask", "action_mask", "old_log_probs", "extra_fields", "uid"]
        data = io.get(batch, fields)
        extra, uids, padding = io.objects(data, "extra_fields"), io.objects(data, "uid"), io.is_padding(batch)
        rows = [
            Row(uid=str(uid), prompt_ids=p, response_ids=r, action_mask=a, extra_fields=e if isinstance(e, dict) else {},
                old_log_probs=o, is_padding=pad, response_mask=m)
            for uid, p, r, a, o, e, pad, m in zip(uids, io.rows(data["prompts"]), io.rows(data["responses"]),
                                                  io.rows(data["action_mask"]), io.rows(data["old_log_probs"]), extra,
                                                  padding, io.rows(data["response_mask"]))
        ]
        metrics = answer_metrics([e for e, pad in zip(extra, padding) if not pad])
        teacher = self.hs.teacher
        if teacher.max_length is None:
            rollout = self.config.actor_rollout_ref.rollout
            teacher = dataclasses.replace(teacher, max_length=int(rollout.prompt_length + rollout.response_length))
        k = self.hs.distill.topk if self._uses_topk else 1
        if self._stage_active():
            scorers = ({"topk_scorer": self._teacher_scorer(topk=True), "topk": k} if self._uses_topk
                       else {"scorer": self._teacher_scorer()})
            start = time.perf_counter()
            with self.teacher_weights.in_reference(self.actor_rollout_wg):
                swapped_in = time.perf_counter()
                result = run_stage(rows, feedback_config=self.hs.feedback, target_config=self.hs.targets,
                                   teacher_config=teacher, renderer=self._renderer(), **scorers)
                swapping_out = time.perf_counter()
            # a moving teacher's own weights in and out of the slot the pass reads (timing_s/hindsight_teacher: the
            # pass itself)
            metrics["timing_s/hindsight_teacher_swap"] = (swapped_in - start) + (time.perf_counter() - swapping_out)
            mapped = result.rows
            metrics.update(result.metrics)
            self._hs_feedback = result.inserted_feedback
            metrics["hindsight/stage_active"] = 1.0
        else:
            # lambda and coef are 0: nothing reads the teacher, so it is not run ("decay into the base estimator")
            mapped = [empty_row(len(r.prompt_ids), len(r.response_ids), k) for r in rows]
            metrics["hindsight/stage_active"] = 0.0
            metrics["hindsight/targeted_token_frac_of_response"] = 0.0
            self._hs_feedback = {}
        if teacher.log_probe:
            metrics.update(self._probe_metrics())
        io.put(batch, {"teacher_logprobs": io.jagged([m.teacher_logprobs for m in mapped], torch.float32),
                       "teacher_ids": io.jagged([m.teacher_ids for m in mapped], torch.int64),
                       "hindsight_mask": io.jagged([m.hindsight_mask for m in mapped], torch.int64)})
        return metrics

    def _probe_metrics(self) -> dict[str, float]:
        """``hindsight.teacher.log_probe``: a fixed token sequence scored by the teacher, and by the KL anchor."""
        probe = torch.arange(3, 35)
        metrics = {}
        with self.teacher_weights.in_reference(self.actor_rollout_wg):
            metrics["hindsight/teacher_probe_logprob"] = float(self._teacher_scorer()([probe])[0].sum())
        if self.hs.teacher.uses_reference_model:
            from verl_hindsight.trainer.teacher_pass import reference_scorer

            # constant unless the anchor moves (kl_anchor=teacher)
            scorer = reference_scorer(self.config.actor_rollout_ref, self.actor_rollout_wg,
                                      ref_in_actor=self.ref_in_actor)
            metrics["hindsight/reference_probe_logprob"] = float(scorer([probe])[0].sum())
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
        from verl.workers.utils.padding import no_padding_2_padding

        data = io.get(batch, ["advantages", "rm_scores", "teacher_logprobs", "old_log_probs", "hindsight_mask",
                              "response_mask", "prompts", "responses", "uid"])
        index = np.array(io.objects(data, "uid"), dtype=object)
        teacher_log_probs = no_padding_2_padding(data.pop("teacher_logprobs"), data)[..., 0]
        dense = data.to_padded_tensor()
        base = dense["advantages"]
        estimator = get_adv_estimator_fn(self.config.algorithm.adv_estimator)
        advantages, returns = estimator(
            token_level_rewards=dense["rm_scores"], response_mask=dense["response_mask"], index=index,
            config=self.config.algorithm, teacher_log_probs=teacher_log_probs,
            old_log_probs=dense["old_log_probs"], hindsight_mask=dense["hindsight_mask"],
            updates_done=self.updates_done, base_advantages=base, metrics=metrics)
        self._hs_base_advantages = base
        return io.put_response_columns(batch, {"advantages": advantages, "returns": returns}, data["response_mask"])

    def _update_actor(self, batch, metrics: dict):
        if self.hs.dump_dir:
            self._dump_trajectories(batch)
        if self.hs.enable:
            batch.extra_info["hs_global_step"] = self.updates_done
        batch = super()._update_actor(batch, metrics)
        metrics.update(self.teacher_weights.update(self.actor_rollout_wg, self.global_steps))
        return batch

    def _dump_trajectories(self, batch) -> None:
        """``hindsight.dump_dir``: sampled trajectories with per-token values, for the viewer (:mod:`.dump`)."""
        from verl_hindsight.trainer.dump import dump_batch

        dump_batch(batch, dump_dir=self.hs.dump_dir, max_rows=self.hs.dump_rows, tokenizer=self._renderer().tokenizer,
                   step=self.global_steps, experiment=str(self.config.trainer.experiment_name),
                   with_stage=self.hs.enable,
                   base_advantages=getattr(self, "_hs_base_advantages", None) if self.serl is not None else None,
                   feedback=getattr(self, "_hs_feedback", {}) if self.hs.enable else {})

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
