"""Trunks, task heads and multi-task architectures (Flax linen).

Every multi-task model returns `{task_name: prediction}` and keeps its parameters
split as `{"shared": ..., "tasks": {task_name: ...}}` so that weighting and
aggregation methods can tell shared from task-specific parameters.
"""
