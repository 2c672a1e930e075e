"""Dynamic batching: texts from concurrent requests share model batches under a token budget.

All queue state lives on the event loop's thread; the model runs on one worker thread, so a batch
is being computed while the next one gathers. A request is split into items (one per text); items
wait in a FIFO queue; a batch takes items from the front until ``max_batch_size`` texts or
``max_batch_tokens`` tokens, after waiting at most ``max_wait_ms`` from its oldest item's arrival
for company. The model call sorts the batch by length (:meth:`AutoModelForEmbedding.encode_ids`);
results are written back to each request's rows, in its own order.

Capacity is counted in texts (``max_queue_items``): admission is all-or-nothing and a request that
does not fit is refused at once (the caller answers 429). A cancelled request (client gone, or
deadline passed) leaves the queue at once and gives its slots back; nothing is computed for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Deque, List, Optional, Sequence, Tuple

import torch

from .config import ServerConfig
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)

__all__ = ["DynamicBatcher", "Job", "QueueFullError"]


class QueueFullError(Exception):
    """Raised by :meth:`DynamicBatcher.submit` when the texts do not fit in the free capacity."""


class Job:
    """One request's texts on their way through the batcher."""

    def __init__(self, ids: Sequence[Sequence[int]], hidden_size: int, holds_slots: bool) -> None:
        self.ids = list(ids)
        self.out = torch.empty((len(self.ids), hidden_size), dtype=torch.float32)
        self.remaining = len(self.ids)
        self.holds_slots = holds_slots
        self.enqueued_at = time.perf_counter()
        self.cancelled = False
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()


class DynamicBatcher:
    """Queue + batching loop around ``encode_fn(list_of_id_lists) -> [n, hidden] float tensor``."""

    def __init__(self, encode_fn: Callable[[List[List[int]]], torch.Tensor], hidden_size: int,
                 config: ServerConfig, metrics: Optional[ServerMetrics] = None) -> None:
        self.encode_fn, self.hidden_size, self.config = encode_fn, hidden_size, config
        self.metrics = metrics or ServerMetrics()
        self._queue: Deque[Tuple[Job, int]] = deque()
        self._queued_tokens = 0
        self.slots_in_use = 0
        self._wakeup: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrievals-model")
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name="retrievals-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop the loop and the model thread."""
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def queue_size(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ requests
    def submit(self, ids: Sequence[Sequence[int]], priority: bool = False) -> Job:
        """Queue a request's token ids. ``priority`` (health probes) goes first and holds no slots."""
        if not self.running:
            raise RuntimeError("the batcher is not running")
        n = len(ids)
        if not priority and self.slots_in_use + n > self.config.max_queue_items:
            raise QueueFullError(f"server at capacity ({self.slots_in_use} of {self.config.max_queue_items} "
                                 f"texts in progress; this request has {n})")
        job = Job(ids, self.hidden_size, holds_slots=not priority)
        items = [(job, i) for i in range(n)]
        if priority:
            self._queue.extendleft(reversed(items))
        else:
            self._queue.extend(items)
            self._set_slots(self.slots_in_use + n)
        self._queued_tokens += sum(len(x) for x in job.ids)
        self.metrics.queue_size.set(len(self._queue))
        self._wakeup.set()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job's queued texts without computing them and give their slots back."""
        if job.cancelled or job.future.done():
            return
        job.cancelled = True
        self._remove_queued(job)
        job.future.cancel()

    def _remove_queued(self, job: Job) -> None:
        kept: Deque[Tuple[Job, int]] = deque()
        dropped = 0
        for item in self._queue:
            if item[0] is job:
                dropped += 1
                self._queued_tokens -= len(job.ids[item[1]])
            else:
                kept.append(item)
        self._queue = kept
        job.remaining -= dropped
        if job.holds_slots:
            self._set_slots(self.slots_in_use - dropped)
        self.metrics.queue_size.set(len(self._queue))

    def _set_slots(self, value: int) -> None:
        self.slots_in_use = value
        self.metrics.slots_in_use.set(value)

    # ------------------------------------------------------------------ batching loop
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._gather_wait(loop)
            batch = self._take_batch()
            await self._run_batch(loop, batch)

    async def _gather_wait(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until the batch is full or its oldest text has waited ``max_wait_ms``."""
        if not self.config.batching or self.config.max_wait_ms <= 0:
            return
        deadline = self._queue[0][0].enqueued_at + self.config.max_wait_ms / 1000.0
        while self._queue and not self._full() and not self._stopping:
            delay = deadline - time.perf_counter()
            if delay <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), delay)
            except TimeoutError:
                return

    def _full(self) -> bool:
        return len(self._queue) >= self.config.max_batch_size or self._queued_tokens >= self.config.max_batch_tokens

    def _take_batch(self) -> List[Tuple[Job, int]]:
        batch: List[Tuple[Job, int]] = []
        tokens = 0
        first_job = self._queue[0][0] if self._queue else None
        while self._queue and len(batch) < self.config.max_batch_size:
            job, i = self._queue[0]
            n = len(job.ids[i])
            if batch and (tokens + n > self.config.max_batch_tokens or (not self.config.batching and job is not first_job)):
                break
            self._queue.popleft()
            self._queued_tokens -= n
            tokens += n
            batch.append((job, i))
        self.metrics.queue_size.set(len(self._queue))
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: List[Tuple[Job, int]]) -> None:
        if not batch:
            return
        ids = [job.ids[i] for job, i in batch]
        started = time.perf_counter()
        for job, _ in batch:
            self.metrics.queue_duration.observe(started - job.enqueued_at)
        self.metrics.batch_size.observe(len(ids))
        self.metrics.batch_tokens.observe(sum(len(x) for x in ids))
        try:
            embeddings = await loop.run_in_executor(self._executor, self.encode_fn, ids)
        except Exception as error:  # the requests in this batch fail; the server keeps serving
            logger.exception("model call failed for a batch of %d texts", len(ids))
            self._fail(batch, error)
            return
        self.metrics.inference_duration.observe(time.perf_counter() - started)
        for row, (job, i) in enumerate(batch):
            job.out[i] = embeddings[row]
            self._finish_item(job)

    def _finish_item(self, job: Job) -> None:
        job.remaining -= 1
        if job.holds_slots:
            self._set_slots(self.slots_in_use - 1)
        if job.remaining == 0 and not job.future.done():
            job.future.set_result(job.out)

    def _fail(self, batch: List[Tuple[Job, int]], error: Exception) -> None:
        for job, _ in batch:
            if not job.future.done():
                job.future.set_exception(error)
                self._remove_queued(job)  # its other texts are not worth computing
            self._finish_item(job)
