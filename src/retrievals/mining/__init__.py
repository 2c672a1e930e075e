from .hard_negatives import mine_hard_negatives, parse_range

__all__ = ["mine_hard_negatives", "parse_range"]
