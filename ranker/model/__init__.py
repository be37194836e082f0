"""The multi-task model: encoder -> trunk -> one head per task. No I/O, optimizers or losses."""

from ranker.model.ranker import MultiTaskRanker, build_ranker

__all__ = ["MultiTaskRanker", "build_ranker"]
