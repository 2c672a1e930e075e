"""Prompt templates per query task: the instruction a generator gets for one document.

Each template is a chat turn (used through the tokenizer's chat template when it has one, e.g. an instruct
LLM) and a plain prompt (a base LM, or a seq2seq model such as a doc2query T5, which reads the document
alone when ``seq2seq`` is empty). Look one up by name: :func:`get_template`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    instruction: str  # "{document}" is replaced by the (truncated) document
    seq2seq: str = "{document}"  # what a seq2seq generator reads

    def render(self, document: str) -> str:
        return self.instruction.replace("{document}", document)


TEMPLATES: Dict[str, PromptTemplate] = {
    "question": PromptTemplate(
        "question",
        "Read the passage and write one question that the passage answers. Write only the question.\n\n"
        "Passage: {document}"),
    "claim": PromptTemplate(
        "claim",
        "Read the scientific abstract and write one short claim (a single sentence) that the abstract supports "
        "or refutes, as a fact-checker would phrase it. Write only the claim.\n\nAbstract: {document}"),
    "keyword": PromptTemplate(
        "keyword",
        "Read the passage and write a short web search query (3 to 8 keywords) that someone looking for this "
        "passage would type. Write only the query.\n\nPassage: {document}"),
}


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"Unknown query template {name!r}; valid: {', '.join(TEMPLATES)}") from None
