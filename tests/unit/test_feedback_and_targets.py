"""Feedback sources, placement, compute_feedback metrics, target selection and the hindsight token mask.

The running example is one task (uid "u") rolled out three times:
  0: success  -- go north (room 0) -> take key (room 1)
  1: failure  -- go south (room 0, wall) -> open door (room 0, locked)
  2: failure  -- go west (room 0) -> a turn without an action (malformed reply)
"""

import pytest

import verl_hindsight.hindsight.feedback as feedback_module
from verl_hindsight.config import FeedbackConfig, TargetConfig
from verl_hindsight.hindsight.feedback import (
    anchor_level,
    anchor_pools,
    compute_feedback,
    get_feedback_source,
    register_feedback_source,
)
from verl_hindsight.hindsight.analyzer import judge_messages, render_trajectory, run_judge
from verl_hindsight.hindsight.records import Trajectory, TurnRecord
from verl_hindsight.hindsight.targets import (
    select_targets,
    target_metrics,
)


def rec(turn, action, anchor, feedback, next_obs=None, error=None, has_action=True, done=False):
    return TurnRecord(
        turn=turn, response_span=(0, 4), has_action=has_action, action=action, observation=anchor, anchor=anchor,
        feedback=feedback, error=error, next_observation=next_obs if next_obs is not None else feedback,
        reward=0.0, done=done, invalid_action=error is not None,
    )


def traj(turns, success=False, uid="u", failure=""):
    return Trajectory(uid=uid, turns=tuple(turns), success=success, episode_return=1.0 if success else 0.0,
                      failure=failure)


WIN = traj([
    rec(0, "go north", "room 0", "You are in room 1.", next_obs="Obs: You are in room 1."),
    rec(1, "take key", "room 1", "You take the key.", next_obs="Obs: You take the key.", done=True),
], success=True)
WALL = traj([
    rec(0, "go south", "room 0", "You hit a wall.", next_obs="Obs: room 0", error="You hit a wall."),
    rec(1, "open door", "room 0", "The door is locked.", next_obs="Obs: The door is locked.", done=True),
])
WEST = traj([
    rec(0, "go west", "room 0", "Nothing happens.", next_obs="Obs: Nothing happens."),
    rec(1, None, "room 0", "Invalid format.", has_action=False, done=True),
])
GROUP = [WIN, WALL, WEST]

SIBLING_TEXT = ("A successful attempt at the same task took these actions:\n"
                "Step 1: go north\n"
                "Step 2: take key")


# ------------------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------------------


def test_immediate_only_action_turns():
    assert get_feedback_source("immediate")(GROUP) == {
        (0, 0): "You are in room 1.", (0, 1): "You take the key.",
        (1, 0): "You hit a wall.", (1, 1): "The door is locked.",
        (2, 0): "Nothing happens.",  # (2, 1) has no action span: no feedback
    }


def test_next_observation():
    assert get_feedback_source("next_observation")(GROUP) == {
        (0, 0): "Obs: You are in room 1.", (0, 1): "Obs: You take the key.",
        (1, 0): "Obs: room 0", (1, 1): "Obs: The door is locked.",
        (2, 0): "Obs: Nothing happens.",
    }


def test_empty_feedback_is_omitted():
    group = [traj([rec(0, "look", "room 0", "")])]
    assert get_feedback_source("immediate")(group) == {}


def test_future_renders_rest_of_trajectory_and_outcome():
    out = get_feedback_source("future")(GROUP)
    assert out[(1, 0)] == ("Step 1: go south -> You hit a wall.\n"
                           "Step 2: open door -> The door is locked.\n"
                           "Outcome: failed (return 0).")
    assert out[(1, 1)] == "Step 2: open door -> The door is locked.\nOutcome: failed (return 0)."
    assert out[(0, 1)] == "Step 2: take key -> You take the key.\nOutcome: succeeded (return 1)."
    # the malformed turn shows up in the rest of the episode but gets no feedback of its own
    assert out[(2, 0)] == ("Step 1: go west -> Nothing happens.\n"
                           "Step 2: (no valid action) -> Invalid format.\n"
                           "Outcome: failed (return 0).")
    assert (2, 1) not in out


def test_future_is_compact():
    long = traj([rec(0, "look", "room 0", "line one\n\n   line two " + "x" * 400)])
    text = get_feedback_source("future")([long])[(0, 0)]
    step = text.splitlines()[0]
    assert step.startswith("Step 1: look -> line one line two xxx")
    assert len(step) == len("Step 1: look -> ") + 300 and step.endswith("…")


def test_successful_sibling_for_failures_only():
    out = get_feedback_source("successful_sibling")(GROUP)
    assert out == {(1, 0): SIBLING_TEXT, (1, 1): SIBLING_TEXT, (2, 0): SIBLING_TEXT}


def test_successful_sibling_none_without_success():
    assert get_feedback_source("successful_sibling")([WALL, WEST]) == {}


def test_successful_sibling_picks_first_success_and_skips_env_failed():
    broken_win = traj([rec(0, "teleport", "room 0", "ok")], success=True, failure="env crashed")
    other_win = traj([rec(0, "jump", "room 0", "You win.")], success=True)
    out = get_feedback_source("successful_sibling")([WALL, broken_win, other_win, WIN])
    expected = "A successful attempt at the same task took these actions:\nStep 1: jump"
    assert out == {(0, 0): expected, (0, 1): expected}


def test_env_failed_trajectory_gets_nothing():
    broken = traj([rec(0, "go east", "room 0", "boom")], failure="env crashed")
    for name in ("immediate", "next_observation", "future", "successful_sibling"):
        out = get_feedback_source(name)([WIN, broken])
        assert all(key[0] != 1 for key in out), name


def test_combination_joins_non_empty_parts_in_order():
    out = get_feedback_source("successful_sibling+immediate")(GROUP)
    assert out[(1, 0)] == SIBLING_TEXT + "\n\nYou hit a wall."
    assert out[(2, 0)] == SIBLING_TEXT + "\n\nNothing happens."
    assert out[(0, 0)] == "You are in room 1."  # the success has no sibling part: no leading blank line
    assert (2, 1) not in out
    reverse = get_feedback_source("immediate+successful_sibling")(GROUP)
    assert reverse[(1, 0)] == "You hit a wall.\n\n" + SIBLING_TEXT


def test_unknown_source_lists_names():
    with pytest.raises(KeyError) as err:
        get_feedback_source("nope")
    assert "immediate" in str(err.value) and "successful_sibling" in str(err.value)
    with pytest.raises(KeyError):
        get_feedback_source("immediate+nope")


def test_register_custom_source():
    @register_feedback_source("test_constant_source")
    def constant(group):
        return {(0, 0): "hi"}

    try:
        assert get_feedback_source("test_constant_source+immediate")(GROUP)[(0, 0)] == "hi\n\nYou are in room 1."
        with pytest.raises(ValueError):
            register_feedback_source("test_constant_source")(constant)
        with pytest.raises(ValueError):
            register_feedback_source("a+b")
    finally:  # keep the process-wide registry as other tests expect it
        feedback_module._REGISTRY.pop("test_constant_source", None)


# ------------------------------------------------------------------------------------------------------------
# Judge
# ------------------------------------------------------------------------------------------------------------


def test_judge_asks_once_per_episode_with_the_rendered_episode():
    seen = []

    def judge(messages):
        seen.append(messages)
        episode = messages[-1]["content"]
        if "go south" in episode:
            return "  This rollout failed. It walked into a wall.  "
        return "This rollout failed. Nothing moved." if "go west" in episode else "This rollout succeeded."

    summaries, metrics = run_judge(GROUP, judge, concurrency=1)
    assert summaries == {0: "This rollout succeeded.", 1: "This rollout failed. It walked into a wall.",
                         2: "This rollout failed. Nothing moved."}
    assert metrics["hindsight/judge_calls"] == 3 and metrics["hindsight/judge_parse_failures"] == 0
    assert metrics["hindsight/judge_steps_selected"] == 2 + 2 + 1  # the action turns the summaries reach
    wall = judge_messages(WALL)
    assert "2 to 4 sentences" in wall[0]["content"] and '"This rollout failed."' in wall[0]["content"]
    assert render_trajectory(WALL) in wall[1]["content"] and "Final outcome: failure" in wall[1]["content"]
    assert wall in seen


@pytest.mark.parametrize("answer,reason", [("", "empty"), ("   ", "empty"), ("The rollout failed.", "schema"),
                                          ("Summary: This rollout failed.", "schema"), (None, "schema")])
def test_judge_bad_answer_counted_and_dropped(answer, reason):
    summaries, metrics = run_judge([WALL], lambda messages: answer)
    assert summaries == {}
    assert metrics["hindsight/judge_calls"] == 1 and metrics["hindsight/judge_parse_failures"] == 1
    assert metrics[f"hindsight/judge_failure/{reason}"] == 1


def test_judge_exception_counted_not_raised():
    def judge(messages):
        if "go south" in messages[-1]["content"]:
            raise TimeoutError("judge down")
        return "This rollout failed. Try the other door."

    summaries, metrics = run_judge([WALL, WEST], judge)
    assert summaries == {1: "This rollout failed. Try the other door."}
    assert metrics["hindsight/judge_failure/answer_error"] == 1


def test_judge_skips_env_failed_and_actionless():
    calls = []
    broken = traj([rec(0, "go east", "room 0", "boom")], failure="env crashed")
    actionless = traj([rec(0, None, "room 0", "Invalid format.", has_action=False)])
    summaries, metrics = run_judge([broken, actionless], lambda m: calls.append(m) or "This rollout failed.")
    assert summaries == {} and calls == []
    assert metrics["hindsight/judge_calls"] == 0 and metrics["hindsight/judge_skipped"] == 2


def with_judge(tr, summary):
    return Trajectory(uid=tr.uid, turns=tr.turns, success=tr.success, episode_return=tr.episode_return,
                      failure=tr.failure, extra={"hs_judge": {"summary": summary, "metrics": {}}})


def test_judge_source_puts_the_recorded_summary_on_every_action_turn():
    group = [with_judge(GROUP[0], "This rollout succeeded. Good."), with_judge(GROUP[1], None),
             with_judge(GROUP[2], "This rollout failed. Bad.")]
    assert get_feedback_source("judge")(group) == {
        (0, 0): "This rollout succeeded. Good.", (0, 1): "This rollout succeeded. Good.",
        (2, 0): "This rollout failed. Bad.",  # turn 1 of trajectory 2 has no action
    }
    feedback, _ = compute_feedback(group, FeedbackConfig(source="judge+immediate"))
    assert feedback[(1, 0)] == "You hit a wall."  # no summary recorded for trajectory 1: the other part only
    assert feedback[(2, 0)] == "This rollout failed. Bad.\n\nNothing happens."


# ------------------------------------------------------------------------------------------------------------
# Anchor placement
# ------------------------------------------------------------------------------------------------------------


def test_anchor_pools_identical_anchors_only():
    assert anchor_pools(GROUP) == [[(0, 0), (1, 0), (1, 1), (2, 0)], [(0, 1)]]


def test_anchor_level_lists_every_sibling_action():
    immediate = get_feedback_source("immediate")(GROUP)
    out = anchor_level(GROUP, immediate)
    room0 = ("action go north -> You are in room 1.\n"
             "action go south -> You hit a wall.\n"
             "action open door -> The door is locked.\n"
             "action go west -> Nothing happens.")
    assert out == {(0, 0): room0, (1, 0): room0, (1, 1): room0, (2, 0): room0,
                   (0, 1): "action take key -> You take the key."}


def test_anchor_level_distinct_actions_and_missing_feedback():
    group = [
        traj([rec(0, "go south", "hall", "")]),  # no feedback: not listed
        traj([rec(0, "go south", "hall", "A wall.")]),
        traj([rec(0, "go south", "hall", "Still a wall.")]),  # same action again: listed once
        traj([rec(0, "sit", "garden", "")]),  # pool without any feedback: no key
    ]
    out = anchor_level(group, get_feedback_source("immediate")(group))
    assert out == {(0, 0): "action go south -> A wall.", (1, 0): "action go south -> A wall.",
                   (2, 0): "action go south -> A wall."}


def test_anchor_similarity_threshold():
    group = [
        traj([rec(0, "go north", "You are in the kitchen. A key is here.", "ok")]),
        traj([rec(0, "go south", "You are in the kitchen. A key is here!", "wall")]),
        traj([rec(0, "dance", "Garden with a fountain.", "you dance")]),
    ]
    feedback = get_feedback_source("immediate")(group)
    assert anchor_pools(group) == [[(0, 0)], [(1, 0)], [(2, 0)]]
    assert anchor_pools(group, similarity=0.95) == [[(0, 0), (1, 0)], [(2, 0)]]
    out = anchor_level(group, feedback, similarity=0.95)
    pooled = "action go north -> ok\naction go south -> wall"
    assert out == {(0, 0): pooled, (1, 0): pooled, (2, 0): "action dance -> you dance"}
    # a threshold above the pair's ratio keeps them apart
    assert anchor_pools(group, similarity=0.999) == [[(0, 0)], [(1, 0)], [(2, 0)]]


# ------------------------------------------------------------------------------------------------------------
# compute_feedback
# ------------------------------------------------------------------------------------------------------------


def test_compute_feedback_groups_by_uid_and_global_indices():
    other = traj([rec(0, "go north", "room 0", "Other task.")], uid="v")
    batch = [WALL, other, WIN]  # uid "u" at 0 and 2, uid "v" at 1
    feedback, metrics = compute_feedback(batch, FeedbackConfig(source="successful_sibling"))
    assert feedback == {
        (0, 0): SIBLING_TEXT, (0, 1): SIBLING_TEXT,  # WIN (index 2) is in WALL's group, not in "v"'s
    }
    assert metrics["hindsight/feedback_coverage"] == pytest.approx(2 / 5)
    assert "hindsight/judge_failures" not in metrics


def test_compute_feedback_coverage_and_env_failed():
    broken = traj([rec(0, "go east", "room 0", "boom")], failure="env crashed")
    feedback, metrics = compute_feedback(GROUP + [broken], FeedbackConfig(source="immediate"))
    assert (3, 0) not in feedback and len(feedback) == 5
    # 6 action turns (WEST's second turn has no action span), 5 with feedback
    assert metrics["hindsight/feedback_coverage"] == pytest.approx(5 / 6)
    assert metrics["hindsight/feedback_turns"] == 5.0


def test_compute_feedback_anchor_placement_and_clip():
    config = FeedbackConfig(source="immediate", placement="anchor", max_chars=20)
    feedback, _ = compute_feedback(GROUP, config)
    # the room 0 pool text ends with "action go west -> Nothing happens."; the end is kept
    assert feedback[(1, 0)] == "…-> Nothing happens."
    assert feedback[(0, 1)] == "…> You take the key."


def test_feedback_config_validation():
    with pytest.raises(ValueError):
        FeedbackConfig(placement="step")
    with pytest.raises(ValueError):
        FeedbackConfig(similarity=1.5)
    with pytest.raises(ValueError):
        FeedbackConfig(max_chars=0)


# ------------------------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------------------------

FEEDBACK = {(0, 0): "a", (1, 1): "b", (2, 0): "", (2, 1): "c"}


def test_targets_all_turns_all_trajectories():
    assert select_targets(GROUP, FEEDBACK, TargetConfig(turns="all", trajectories="all")) == {
        0: [0, 1], 1: [0, 1], 2: [0],  # WEST's turn 1 has no action span
    }


def test_targets_failed_only():
    assert select_targets(GROUP, FEEDBACK, TargetConfig(turns="all", trajectories="failed")) == {
        1: [0, 1], 2: [0],
    }


def test_targets_with_feedback():
    # (2, 0) has empty text; (2, 1) has text but no action span
    assert select_targets(GROUP, FEEDBACK, TargetConfig(turns="with_feedback", trajectories="all")) == {
        0: [0], 1: [1],
    }


def test_targets_analyzer_first_and_topk():
    long_fail = traj([rec(i, f"a{i}", "r", "x") for i in range(5)])
    batch = [WIN, long_fail, WEST]
    picks = {1: [3, 1, 4, 0], 2: [1, 0], 0: [0]}
    first = select_targets(batch, {}, TargetConfig(turns="analyzer_first", trajectories="failed"), picks)
    assert first == {1: [0], 2: [0]}  # WEST's pick 1 has no action span; WIN is not failed
    topk = select_targets(batch, {}, TargetConfig(turns="analyzer_topk", k=3, trajectories="failed"), picks)
    assert topk == {1: [0, 1, 3], 2: [0]}
    everyone = select_targets(batch, {}, TargetConfig(turns="analyzer_topk", k=2, trajectories="all"), picks)
    assert everyone == {0: [0], 1: [0, 1], 2: [0]}
    assert select_targets(batch, {}, TargetConfig(turns="analyzer_first"), {}) == {}
    with pytest.raises(ValueError):
        select_targets(batch, {}, TargetConfig(turns="analyzer_first"))


def test_targets_env_failed_excluded():
    broken = traj([rec(0, "go east", "room 0", "boom")], failure="env crashed")
    batch = [broken, WALL]
    config = TargetConfig(turns="all", trajectories="all")
    assert select_targets(batch, {(0, 0): "boom"}, config) == {1: [0, 1]}
    assert select_targets(batch, {}, TargetConfig(turns="analyzer_first"), {0: [0]}) == {}


def test_target_config_validation():
    with pytest.raises(ValueError):
        TargetConfig(turns="first")
    with pytest.raises(ValueError):
        TargetConfig(trajectories="successful")
    with pytest.raises(ValueError):
        TargetConfig(k=0)


def test_target_metrics():
    assert target_metrics({0: [0, 1], 3: [1], 5: [4]}) == {
        "hindsight/selected_trajectories": 3.0,
        "hindsight/selected_turns": 4.0,
        "hindsight/target_turn_hist/0": 1.0,
        "hindsight/target_turn_hist/1": 2.0,
        "hindsight/target_turn_hist/4": 1.0,
    }
    assert target_metrics({}) == {"hindsight/selected_trajectories": 0.0, "hindsight/selected_turns": 0.0}
