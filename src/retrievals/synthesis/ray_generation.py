"""Generation on Ray actors (``synthesize --num_workers N [--ray_address ...]``): each actor loads the
generator once and generates whole shards; the driver streams the corpus (a few shards in flight per actor,
never the whole corpus), filters and writes the parts, so de-duplication and resume stay as in one process.
Paths are resolved in the driver; the actors only read the generator's files."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

from ..index.ray_engine import import_ray, ray_session

IN_FLIGHT_PER_WORKER = 2


class _GeneratorActor:
    def __init__(self, job: Any, generate: Callable) -> None:
        import torch

        torch.set_num_threads(1)
        self.job, self.generate = job, generate
        self.generator = job.load_generator()

    def run(self, index: int, rows: List[Tuple[str, str]]):
        return index, rows, self.generate(self.generator, self.job, index, rows)


def generate_with_ray(job: Any, generate: Callable, pending: Iterable[Tuple[int, list]], num_workers: int,
                      ray_address: Optional[str] = None) -> Iterator[Tuple[int, list, List[List[str]]]]:
    """``(shard index, rows, generate(generator, job, index, rows))`` as the actors finish them (any order);
    ``job`` is a :class:`~retrievals.synthesis.job.SynthesisJob`."""
    ray = import_ray()
    generator = job.generator if not os.path.exists(job.generator) else os.path.abspath(job.generator)
    job = replace(job, generator=generator, output_dir=os.path.abspath(job.output_dir))
    with ray_session(num_workers, ray_address):
        from ray.util import ActorPool

        actor = ray.remote(num_cpus=1)(_GeneratorActor)
        pool = ActorPool([actor.remote(job, generate) for _ in range(num_workers)])
        source, queued = iter(pending), 0
        for item in source:
            pool.submit(lambda a, v: a.run.remote(*v), item)
            queued += 1
            if queued >= num_workers * IN_FLIGHT_PER_WORKER:
                yield pool.get_next_unordered()
                queued -= 1
        while pool.has_next():
            yield pool.get_next_unordered()
