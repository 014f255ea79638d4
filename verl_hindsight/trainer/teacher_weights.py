"""The trainer's side of the teacher's weights: which weights score the teacher pass, how a moving teacher follows
the policy, and how it is saved with verl's checkpoints.

A frozen, EMA or lagged teacher is the worker's reference model (:mod:`.teacher_worker`). When the run also has a KL
to the reference and the teacher moves, the reference model must stay the initial policy (the KL anchor), so the
teacher gets a copy of the weights of its own, swapped into the reference model for the teacher pass only
(``hindsight.teacher.kl_anchor=initial``).

With LoRA, verl keeps the reference inside the actor: the base model with the adapter switched off. The frozen
teacher is exactly that (no weights of its own), and a moving teacher is a second adapter: a copy of the actor's
trainable (adapter) tensors, swapped into the actor's adapter for the teacher pass only and updated from the
trained adapter (EMA lerp or periodic copy of each LoRA factor, as HINT-SD's released code does). It costs the
adapter's bytes, not a model's, and the KL anchor stays the base.

The worker methods named ``hs_*`` do the tensor work on every rank.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager

from verl_hindsight.config import TeacherConfig

logger = logging.getLogger(__name__)

TEACHER_DIR = "hindsight_teacher"
STATE_FILE = "teacher_state.json"


class TeacherWeights:
    def __init__(self, teacher: TeacherConfig, stage_enabled: bool, kl_to_reference: bool, lora: bool = False):
        self.teacher = teacher
        self.moving = stage_enabled and teacher.moves
        #: the moving teacher is a second LoRA adapter (swapped into the actor's adapter for the teacher pass)
        self.in_adapter = self.moving and lora
        self.own_weights = self.in_adapter or (self.moving and teacher.kl_anchor == "initial" and kl_to_reference)
        self.state_bytes = 0  # bytes of the teacher's own copy on one rank (0: none)
        self._copy_ready = False

    def ensure_copy(self, wg) -> None:
        """Give a moving teacher its own weights, once (verl resumes checkpoints before ``on_init_end``, so
        :meth:`load` may come first)."""
        if not self.own_weights or self._copy_ready:
            return
        self.state_bytes = max(wg.hs_init_teacher_copy(self.in_adapter))
        self._copy_ready = True
        what = "a LoRA adapter of its own" if self.in_adapter else "its own copy of the weights"
        logger.info("hindsight: the %s teacher has %s (%.2f MB per rank); the KL anchor stays on the initial "
                    "policy", self.teacher.kind, what, self.state_bytes / 2**20)

    @contextmanager
    def in_reference(self, wg):
        """The teacher's weights in the reference model for the duration of the block (nothing to do when they are
        the reference model's own)."""
        if not self.own_weights:
            yield
            return
        wg.hs_swap_teacher()
        try:
            yield
        finally:
            wg.hs_swap_teacher()

    def update(self, wg, global_steps: int) -> dict[str, float]:
        """After an actor update: EMA lerp toward the policy, or a lagged copy every ``sync_interval`` steps."""
        if not self.moving:
            return {}
        if self.teacher.kind == "ema":
            mix = 1.0 - self.teacher.ema_decay
        elif self.teacher.kind == "lagged" and global_steps % self.teacher.sync_interval == 0:
            mix = 1.0
        else:
            return {}
        change = wg.hs_update_teacher(mix)
        return {"hindsight/teacher_update_mean_abs": float(sum(change) / len(change)),
                "hindsight/teacher_state_bytes": float(self.state_bytes)}

    def save(self, wg, checkpoint_dir: str, global_steps: int) -> None:
        """Next to verl's checkpoint of ``global_steps`` (``checkpoint_dir`` is its ``global_step_N`` folder)."""
        if not self.moving:
            return
        folder = os.path.abspath(os.path.join(checkpoint_dir, TEACHER_DIR))
        wg.hs_save_teacher(folder)
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump({"kind": self.teacher.kind, "global_steps": global_steps, "ema_decay": self.teacher.ema_decay,
                       "sync_interval": self.teacher.sync_interval, "lora_adapter": self.in_adapter}, f)

    def load(self, wg, checkpoint_dir: str) -> None:
        """Restore the teacher saved with the checkpoint in ``checkpoint_dir`` (a ``global_step_N`` folder)."""
        if not self.moving:
            return
        folder = os.path.abspath(os.path.join(checkpoint_dir, TEACHER_DIR))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"resuming a {self.teacher.kind} teacher but {folder} is missing: the checkpoint "
                                    "was not written by the hindsight trainer with this teacher kind")
        self.ensure_copy(wg)  # the saved weights are the teacher's, not the anchor's
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        if state.get("kind") != self.teacher.kind:
            raise ValueError(f"checkpoint teacher kind {state.get('kind')!r} != hindsight.teacher.kind "
                             f"{self.teacher.kind!r}")
        if bool(state.get("lora_adapter", False)) != self.in_adapter:
            saved = "a LoRA adapter" if state.get("lora_adapter") else "full weights"
            raise ValueError(f"the checkpoint's {self.teacher.kind} teacher is {saved}, this run "
                             f"{'trains LoRA' if self.in_adapter else 'trains full weights'}: resume with the "
                             "LoRA settings (actor_rollout_ref.model.lora_rank) of the run that saved it")
        wg.hs_load_teacher(folder)
        logger.info("hindsight: restored the %s teacher from %s", self.teacher.kind, folder)
