"""Two FSDP ranks on CPU (``trainer.n_gpus_per_node=2``, gloo) against one rank, through stock ``main_ppo``.

Rollouts are greedy (``rollout.top_k=1``), so both runs train on the same batch at step 1: one rank's and two
ranks' losses and teacher log-probs must agree there up to the order of floating-point reductions. Greedy groups
are identical, so a group baseline (GRPO) gives every row advantage 0; SERL runs on verl's REINFORCE++ base instead,
whose batch-wide baseline leaves non-zero advantages (the toy's partial returns differ between tasks).

The two-rank runs batch by tokens as the GPU recipes do (``use_dynamic_bsz``, a budget of one full row, so every
pass, the teacher's included, is split into several length-balanced micro-batches in another order), the one-rank
runs by fixed micro-batches of rows: equal losses show the hindsight terms are normalized per mini-batch, not per
micro-batch, and that the teacher's log-probs come back in row order.
"""

import pytest

from verl_hindsight.environment.data import write_env_dataset

from conftest_e2e import base_model_probe, probe_gap_per_token, run_recipe

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_env_dataset("toy", tmp_path_factory.mktemp("toy_data"), max_train=16, max_val=4)


def _overrides(format_model, data, run_dir, ranks, extra=()):
    train, val = data
    return [f"actor_rollout_ref.model.path={format_model}", f"data.train_files={train}", f"data.val_files={val}",
            f"trainer.default_local_dir={run_dir / 'ckpt'}", f"trainer.n_gpus_per_node={ranks}",
            "actor_rollout_ref.rollout.top_k=1", "hindsight.teacher.log_probe=true", *extra]


# one toy row is at most 256 + 256 tokens; the log-prob passes (rollout, ref: the teacher) follow the actor's budget
DYNAMIC = ["actor_rollout_ref.actor.use_dynamic_bsz=true", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=512"]


def _run(recipe, format_model, data, tmp_path, name, ranks, extra=()):
    run_dir = tmp_path / name
    run_dir.mkdir()
    batching = DYNAMIC if ranks == 2 else []
    return run_recipe(recipe, run_dir, _overrides(format_model, data, run_dir, ranks, [*batching, *extra]))


def _two_workers(run_dir) -> bool:
    """verl prints each FSDP worker's output under its Ray actor's pid: two ranks, two pids."""
    import re

    return len(set(re.findall(r"WorkerDict pid=(\d+)", (run_dir / "verl.log").read_text()))) == 2


# keys whose step-1 values depend only on the batch, the weights and the teacher: the same at one and two ranks
SAME_BATCH = ("hindsight/targeted_tokens", "hindsight/teacher_tokens_forwarded", "response_length/mean")
SAME_VALUE = ("hindsight/gap_mean", "hindsight/gap_abs_mean", "hindsight/teacher_probe_logprob")


HINT_SD = ["hindsight.teacher.kind=ema", "hindsight.teacher.ema_decay=0.5"]
# SERL on REINFORCE++: greedy groups are identical, so a group baseline would give every row advantage 0. Without a
# KL term, as every GPU recipe runs: the reference engine then holds the lagged teacher itself
SERL = ["hindsight.teacher.kind=lagged", "hindsight.teacher.sync_interval=1",
        "algorithm.serl.base_estimator=reinforce_plus_plus", "actor_rollout_ref.actor.use_kl_loss=false"]


def _compare(one, two, run_dirs, loss_keys):
    assert len(one) == len(two) == 2
    assert _two_workers(run_dirs[1]) and not _two_workers(run_dirs[0])
    for key in SAME_BATCH:
        assert two[0][key] == one[0][key], key
    assert one[0]["hindsight/targeted_tokens"] > 0
    for key in loss_keys:
        assert one[0][key] != 0, key  # a loss that is 0 at both sizes would compare nothing
    for key in SAME_VALUE + loss_keys:
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-4, abs=1e-6), key
    # step 1's teacher is the warm start at both sizes; after one update each it moved the same way
    assert two[1]["hindsight/teacher_probe_logprob"] == pytest.approx(one[1]["hindsight/teacher_probe_logprob"],
                                                                      rel=1e-3)
    assert two[1]["hindsight/teacher_probe_logprob"] != two[0]["hindsight/teacher_probe_logprob"]


def test_serl_lagged_without_kl_at_two_ranks_matches_one_rank(format_model, data, tmp_path):
    one = _run("cpu/toy_serl", format_model, data, tmp_path, "one", 1, SERL)
    two = _run("cpu/toy_serl", format_model, data, tmp_path, "two", 2, SERL)
    _compare(one, two, (tmp_path / "one", tmp_path / "two"),
             ("actor/pg_loss", "serl/weight_mean", "critic/advantages/max", "critic/advantages/min"))
    # no KL term: what scores as the reference is the teacher, held by the reference engine without weights of its
    # own; it starts as the warm start and moves with every sync, not staying put as a KL anchor would
    for rows in (one, two):
        assert not any(k.startswith("actor/kl") for m in rows for k in m)
        for m in rows:
            assert m["hindsight/reference_probe_logprob"] == m["hindsight/teacher_probe_logprob"]
            assert m["hindsight/teacher_state_bytes"] == 0.0
        assert rows[0]["hindsight/teacher_update_mean_abs"] > 0
    assert probe_gap_per_token(one[0]["hindsight/teacher_probe_logprob"], base_model_probe(format_model)) < 1e-5


def test_hint_sd_ema_topk_tail_at_two_ranks_matches_one_rank_and_resumes(format_model, data, tmp_path):
    one = _run("cpu/toy_hint_sd", format_model, data, tmp_path, "one", 1, HINT_SD)
    two = _run("cpu/toy_hint_sd", format_model, data, tmp_path, "two", 2, HINT_SD + ["trainer.save_freq=1"])
    _compare(one, two, (tmp_path / "one", tmp_path / "two"), ("actor/hindsight/distill_loss",))
    assert probe_gap_per_token(two[0]["hindsight/teacher_probe_logprob"], base_model_probe(format_model)) < 1e-5
    # toy_common has a KL to the reference: the EMA teacher has its own weights and moves, the anchor stays the
    # warm start, scored in fp32 like the actor (cpu_common.yaml)
    for rows in (one, two):
        assert rows[0]["hindsight/reference_probe_logprob"] == rows[0]["hindsight/teacher_probe_logprob"]
        assert rows[1]["hindsight/reference_probe_logprob"] == rows[0]["hindsight/reference_probe_logprob"]
        assert rows[1]["hindsight/teacher_state_bytes"] > 0
    assert probe_gap_per_token(one[0]["hindsight/reference_probe_logprob"], base_model_probe(format_model)) < 1e-5
    # the EMA teacher is saved shard by shard, one file per rank, and a resume at two ranks restores it
    saved = tmp_path / "two" / "ckpt" / "global_step_1" / "hindsight_teacher"
    assert sorted(p.name for p in saved.glob("teacher_rank*.pt")) == ["teacher_rank0.pt", "teacher_rank1.pt"]
    resumed = _run("cpu/toy_hint_sd", format_model, data, tmp_path, "resumed", 2, HINT_SD + [
        "trainer.resume_mode=resume_path", f"trainer.resume_from_path={saved.parent}"])
    assert len(resumed) == 1  # only step 2 ran
    assert resumed[0]["hindsight/teacher_probe_logprob"] == pytest.approx(two[1]["hindsight/teacher_probe_logprob"],
                                                                          abs=1e-5)
    assert resumed[0]["hindsight/reference_probe_logprob"] == two[0]["hindsight/reference_probe_logprob"]
