"""Synthetic queries for a corpus with no labelled queries (GPL / InPars style): a local language model
writes queries for each document (:mod:`.generator`, prompts in :mod:`.templates`), filters keep the
useful ones (:mod:`.filters`), and :mod:`.job` streams a corpus through both, resumable, locally or on Ray.
"""

from .filters import FilterSettings, QueryFilter, clean_query
from .templates import TEMPLATES, PromptTemplate, get_template

__all__ = ["FilterSettings", "QueryFilter", "clean_query", "TEMPLATES", "PromptTemplate", "get_template"]
