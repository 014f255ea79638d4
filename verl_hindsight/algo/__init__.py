"""The hindsight methods' math: the SERL advantage estimator and the teacher-student divergence losses."""
