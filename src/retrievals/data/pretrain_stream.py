"""A raw corpus as an endless, resumable stream of training pairs (``torch`` ``IterableDataset``).

:class:`PretrainPairs` reads the corpus one document at a time (JSONL, ``.jsonl.gz``, Parquet or a
folder of them through :class:`~retrievals.data.corpus.CorpusReader`; or plain text, one document per
line, ``.txt`` / ``.txt.gz``), shuffles it through a bounded buffer, and yields
:func:`~retrievals.data.pretrain.make_pair` pairs, pass after pass, without end (the Trainer stops at
``max_steps``). Memory: the shuffle buffer (``shuffle_buffer`` documents), whatever the corpus size.

Everything is a function of ``(seed, position in the stream)``: the buffer's draws are seeded by
``(seed, pass)`` and each pair by ``(seed, example index)``. A resumed run sets ``start`` to the
number of examples already trained on (:class:`StreamPositionCallback` does it from the Trainer's
step) and the stream skips that many documents without building pairs, so it continues with the
examples the uninterrupted run would have seen next. With ``N`` data-loader workers, worker ``k``
keeps the batches ``k, k + N, ...`` of the one stream, so the batches are those of a single process.
"""

from __future__ import annotations

import gzip
import logging
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch
from transformers import TrainerCallback

from .corpus import CorpusError, CorpusOptions, CorpusReader, CorpusStats
from .pretrain import DEFAULT_BOUNDS, CropBounds, Document, check_strategy, make_pair

logger = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".txt.gz")


def is_plain_text(path: str) -> bool:
    return str(path).endswith(TEXT_EXTENSIONS)


class DocumentReader:
    """One pass over a corpus as :class:`~retrievals.data.pretrain.Document` s; ``stats`` counts the
    documents read, yielded and skipped (empty, or invalid with ``skip_invalid``)."""

    def __init__(self, path: str, options: Optional[CorpusOptions] = None) -> None:
        self.path, self.options = str(path), options or CorpusOptions()
        self._reader = None if is_plain_text(self.path) else CorpusReader(self.path, self.options)
        if self._reader is None:
            open(self.path, "rb").close()  # a missing file fails now, not inside a data-loader worker
        self.stats = CorpusStats()

    def __iter__(self) -> Iterator[Document]:
        if self._reader is None:
            yield from self._text_lines()
            return
        for row in self._reader:
            yield Document(row.title, row.body)
        self.stats = self._reader.stats

    def _text_lines(self) -> Iterator[Document]:
        self.stats = stats = CorpusStats()
        opener = gzip.open if self.path.endswith(".gz") else open
        with opener(self.path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                stats.read += 1
                try:
                    text = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{self.path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start})") from None
                if not text:
                    stats.empty += 1
                    continue
                stats.rows += 1
                yield Document("", text)


def scan_corpus(path: str, options: Optional[CorpusOptions] = None) -> Dict[str, int]:
    """One pass before training: the counts of documents, empty (skipped) ones, invalid (skipped) ones and
    documents with both a title and a body; a malformed record raises here, naming ``file:line``."""
    reader = DocumentReader(path, options)
    titled = sum(1 for doc in reader if doc.title and doc.body)
    stats = reader.stats
    return {"documents": stats.rows, "empty": stats.empty, "invalid": stats.invalid, "titled": titled}


class PretrainPairs(torch.utils.data.IterableDataset):
    """Endless ``{"query", "positive"}`` pairs from the documents of ``path`` (see the module doc).

    ``batch_size`` is the data loader's (per device); it only matters with data-loader workers.
    """

    def __init__(self, path: str, strategy: str = "crop", bounds: CropBounds = DEFAULT_BOUNDS, seed: int = 42,
                 shuffle_buffer: int = 10000, batch_size: int = 1, options: Optional[CorpusOptions] = None) -> None:
        super().__init__()
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.documents = DocumentReader(path, options)
        self.strategy, self.bounds, self.seed = check_strategy(strategy), bounds, seed
        self.shuffle_buffer, self.batch_size = shuffle_buffer, batch_size
        self.start = 0  # examples already consumed (a resumed run skips them)

    def shuffled(self, pass_no: int) -> Iterator[Document]:
        """One pass over the corpus through a buffer of ``shuffle_buffer`` documents (1 = file order)."""
        rng = np.random.default_rng((self.seed, pass_no))
        buffer: list = []
        for doc in self.documents:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(doc)
                continue
            at = int(rng.integers(len(buffer)))
            buffer[at], doc = doc, buffer[at]
            yield doc
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        index, pass_no = 0, 0
        while True:
            before = index
            for doc in self.shuffled(pass_no):
                index += 1
                position = index - 1 - self.start
                if position >= 0 and (position // self.batch_size) % workers == worker:
                    yield make_pair(doc, self.strategy, self.seed, index - 1, self.bounds)
            if index == before:
                raise ValueError(f"{self.documents.path}: no non-empty documents to make pairs from")
            if worker == 0:
                stats = self.documents.stats
                logger.info("pair stream: pass %d over %s done (%d documents, %d empty and %d invalid skipped)",
                            pass_no + 1, self.documents.path, stats.rows, stats.empty, stats.invalid)
            pass_no += 1


class StreamPositionCallback(TrainerCallback):
    """Resume the stream where the checkpoint left it. At the start of training the stream is pointed past
    the examples the restored steps consumed (``global_step x per-device batch x accumulation steps x
    processes``); use it with ``ignore_data_skip=True`` (the Trainer must not skip batches as well).

    ``restore_rng`` (``partial(trainer._load_rng_state, checkpoint)`` on resume): without a batch skip the
    Trainer restores the checkpoint's random state *before* the data loader draws its base seed from it,
    which would shift every later dropout mask; it is restored once more at the first step, where the
    Trainer itself restores it after a batch skip, so the resumed run continues the uninterrupted run's
    random sequence.
    """

    def __init__(self, dataset: PretrainPairs, restore_rng: Optional[Callable[[], None]] = None) -> None:
        self.dataset, self.restore_rng = dataset, restore_rng

    def on_train_begin(self, args, state, control, **kwargs):
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        self.dataset.start = state.global_step * per_step
        if self.dataset.start:
            logger.info("resumed at step %d: the pair stream skips the %d examples already trained on",
                        state.global_step, self.dataset.start)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.restore_rng is not None:
            self.restore_rng()
            self.restore_rng = None
        return control
