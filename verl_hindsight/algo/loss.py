"""The actor loss with hindsight distillation: verl's PPO loss + coef(step) * D(student || sg(teacher)).

Installed by the hindsight trainer through verl's ``set_loss_fn`` (no patching): the worker calls
``loss_fn(model_output=..., data=micro_batch, dp_group=...)`` and the micro-batch carries every TransferQueue field
of its rows, including the stage's ``teacher_logprobs`` (verl's distillation layout) and ``hindsight_mask``.

Normalization: the divergence is a mean over *targeted* tokens, not over all response tokens, so its size does not
shrink when a batch holds more untargeted tokens (HINT-SD's token-mean over selected spans). Each micro-batch
contributes ``sum(D * mask) / N * dp_size`` (verl's convention: micro-batch losses are summed, data-parallel
gradients averaged), where ``N`` is the number of targeted tokens of the PPO mini-batch over all data-parallel
ranks: ``hindsight_num_targets``, counted by :func:`targeted_tokens` where verl counts its own ``batch_num_tokens``
(once per mini-batch, before the micro-batch split; the hindsight worker's training worker does it).
"""

from __future__ import annotations


import torch
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from verl_hindsight.algo.divergences import SAMPLED_DIVERGENCES, sampled_divergence
from verl_hindsight.config import DIVERGENCES, DistillConfig
from verl_hindsight.algo.topk_distill import (
    STUDENT_KL_KEY,
    STUDENT_MASS_KEY,
    TEACHER_MASS_KEY,
    student_topk_tail_kl,
)

# the config names every divergence this module implements
assert set(DIVERGENCES) == {*SAMPLED_DIVERGENCES, "topk_tail"}


NUM_TARGETS_KEY = "hindsight_num_targets"  # non-tensor field of a mini-batch (and its micro-batches)


def targeted_tokens(data) -> torch.Tensor:
    """Targeted tokens of ``data``'s rows (``hindsight_mask`` and ``response_mask`` both 1), a 0-d int64 tensor;
    jagged or padded columns."""
    def flat(name: str) -> torch.Tensor:
        value = data[name]
        return (value.values() if value.is_nested else value).bool()

    return (flat("hindsight_mask") & flat("response_mask")).sum()


def masked_target_mean(divergence: torch.Tensor, mask: torch.Tensor, num_targets: float,
                       dp_size: int = 1) -> torch.Tensor:
    """This micro-batch's contribution to the mini-batch's mean over targeted tokens (see module doc)."""
    total = (divergence * mask.to(divergence.dtype)).sum()
    if num_targets <= 0:
        return total * 0.0  # keeps the graph connected; nothing targeted in this mini-batch
    return total / float(num_targets) * dp_size


def hindsight_ppo_loss(config, model_output=None, data=None, dp_group=None, student_logits=None, *,
                       distill: DistillConfig):
    """verl actor loss (``ppo_loss`` signature plus the bound ``distill`` config).

    With ``student_logits`` it is verl's logits-processor call (``divergence=topk_tail`` only): it returns the
    per-token top-k + tail reverse KL, which the engine hands back in ``model_output`` for the loss call.
    """
    if student_logits is not None:
        if distill.divergence != "topk_tail":
            return {}
        return student_topk_tail_kl(student_logits, data)
    pg_loss, metrics = ppo_loss(config, model_output, data, dp_group)
    loss = pg_loss if distill.policy_gradient else pg_loss * 0.0
    if not distill.enabled:
        return loss, metrics
    if "teacher_logprobs" not in data.keys() or "hindsight_mask" not in data.keys():
        raise RuntimeError("hindsight.distill.coef > 0 but the batch has no teacher_logprobs/hindsight_mask: the "
                           "hindsight stage did not run; use trainer.v1.trainer_mode=hindsight with "
                           "hindsight.enable=true")
    num_targets = tu.get_non_tensor_data(data, NUM_TARGETS_KEY, None)
    if num_targets is None:
        raise RuntimeError(f"the micro-batch has no {NUM_TARGETS_KEY}: the actor's training worker is not the "
                           "hindsight one (trainer.v1.trainer_mode=hindsight selects it)")
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    fields = data.select("hindsight_mask", "response_mask").to_padded_tensor()
    mask = fields["hindsight_mask"].bool() & fields["response_mask"].bool()
    if mask.shape != log_prob.shape:
        raise RuntimeError(f"hindsight_mask {tuple(mask.shape)} and student log-probs {tuple(log_prob.shape)} are not "
                           "aligned; the hindsight stage wrote a wrong layout")
    if distill.divergence == "topk_tail":
        if STUDENT_KL_KEY not in model_output:
            raise RuntimeError("hindsight.distill.divergence=topk_tail but the engine did not run the top-k hook "
                               "(the micro-batch lacked distillation_use_topk, or the engine uses fused kernels); "
                               "the hindsight worker sets the flag: check trainer.v1.trainer_mode=hindsight and "
                               "actor_rollout_ref.model.use_fused_kernels=false")
        divergence = no_padding_2_padding(model_output[STUDENT_KL_KEY], data).float()
        for key, name in ((STUDENT_MASS_KEY, "topk_student_mass"), (TEACHER_MASS_KEY, "topk_teacher_mass")):
            mass = no_padding_2_padding(model_output[key], data).float()
            metrics[f"hindsight/{name}"] = Metric(value=(mass * mask).sum() / mask.sum().clamp_min(1),
                                                  aggregation=AggregationType.MEAN)
    else:
        # the teacher's log-prob of each sampled token, response-aligned, read as verl's own distillation loss does
        teacher = no_padding_2_padding(data["teacher_logprobs"], data)[..., 0]
        divergence = sampled_divergence(distill.divergence, log_prob, teacher, distill.jsd_beta)

    step = int(tu.get_non_tensor_data(data, "hs_global_step", 0) or 0)
    dp_size = int(tu.get_non_tensor_data(data, "dp_size", 1) or 1)
    term = masked_target_mean(divergence, mask, float(num_targets), dp_size)
    coef = distill.coef_at(step)
    loss = loss + coef * term
    metrics["hindsight/distill_loss"] = Metric(value=term.detach(), aggregation=AggregationType.SUM)
    metrics["hindsight/distill_coef"] = coef
    if not distill.policy_gradient:
        metrics["hindsight/pg_loss_unused"] = Metric(value=pg_loss.detach(), aggregation=AggregationType.SUM)
    return loss, metrics
