"""Cost measurements of the trainers: training-step time, inference time and peak memory against vanilla."""
