"""The hindsight V1 trainer (``trainer.v1.trainer_mode=hindsight``)."""
