from .hard_negatives import mine_hard_negatives, parse_range
from .teacher import load_teacher, score_candidates, score_records

__all__ = ["mine_hard_negatives", "parse_range", "load_teacher", "score_candidates", "score_records"]
