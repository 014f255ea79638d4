"""The hindsight methods\x27 math: the SERL advantage estimator and the teacher-student divergence losses."""
