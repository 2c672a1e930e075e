"""The OpenVINO backend: export a torch embedding forward to an OpenVINO graph, quantize it to int8 on
calibration batches (NNCF, static: activations too), and run it with several inference streams.

The graph takes ``input_ids`` and ``attention_mask`` (int64, dynamic batch and length) and returns the
pooled float32 vectors ``[batch, dim]``: pooling is inside the graph, so no Python runs per layer or per
token. Inputs come already sorted by length and batched by a token budget (the model's batching).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import require

logger = logging.getLogger(__name__)

GRAPH_NAME = "retrievals_model.xml"  # not sentence-transformers' openvino_model.xml beside it
INT8_NAME = "retrievals_model_int8.xml"
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
Batch = Tuple[Sequence[int], np.ndarray, np.ndarray]  # (rows of the output, input_ids, attention_mask)


def export(module, folder: str, example: Dict[str, object]) -> str:
    """Convert ``module`` (``forward(input_ids, attention_mask) -> [batch, dim]``) to ``folder/GRAPH_NAME``
    with dynamic batch and length; the weights stay fp32 (precision is chosen when compiling)."""
    require("openvino", "backend='openvino'")
    import openvino as ov
    import torch

    shape = ov.PartialShape([-1, -1])
    module.eval()
    with torch.no_grad():
        graph = ov.convert_model(module, example_input=example,
                                 input=[("input_ids", shape, ov.Type.i64), ("attention_mask", shape, ov.Type.i64)])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, GRAPH_NAME)
    ov.save_model(graph, path, compress_to_fp16=False)
    return path


def quantize(graph_path: str, calibration: List[Dict[str, np.ndarray]], out_path: str) -> str:
    """Static int8 (weights and activations) with NNCF's transformer preset, calibrated on ``calibration``
    (input dicts, one text each: padding would skew the activation ranges)."""
    require("nncf", "quantization='int8' with backend='openvino'")
    if not calibration:
        raise ValueError("int8 calibration needs at least one document")
    import nncf
    import openvino as ov

    graph = ov.Core().read_model(graph_path)
    quantized = nncf.quantize(graph, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calibration))
    ov.save_model(quantized, out_path, compress_to_fp16=False)
    return out_path


def default_streams() -> Optional[int]:
    """``RETRIEVALS_OV_STREAMS`` if set, else None (OpenVINO's throughput hint chooses per CPU)."""
    value = os.environ.get("RETRIEVALS_OV_STREAMS")
    return int(value) if value else None


class OpenVINORunner:
    """A compiled graph and a queue of inference requests, one per stream; :meth:`encode` keeps every
    stream busy and writes each batch's vectors into its rows. One caller at a time (a lock): the streams
    are shared, not the callers' batches."""

    def __init__(self, graph_path: str, precision: str = "fp32", streams: Optional[int] = None,
                 threads: Optional[int] = None) -> None:
        require("openvino", "backend='openvino'")
        import openvino as ov

        if precision not in HINTS:
            raise ValueError(f"Unknown precision {precision!r} for OpenVINO; valid: {', '.join(HINTS)}")
        config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "THROUGHPUT"}
        streams = streams or default_streams()
        if streams:
            config["NUM_STREAMS"] = str(streams)
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        self.graph_path = graph_path
        self.precision = precision
        self.compiled = ov.Core().compile_model(graph_path, "CPU", config)
        self.requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue = ov.AsyncInferQueue(self.compiled, self.requests)
        self._lock = threading.Lock()

    def encode(self, batches: Iterable[Batch], out: np.ndarray) -> None:
        """Run every batch (any order) and write its pooled vectors to ``out[rows]``."""
        errors: List[BaseException] = []

        def done(request, rows) -> None:
            try:
                out[rows] = request.get_output_tensor(0).data
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)

        with self._lock:
            self._queue.set_callback(done)
            try:
                for rows, input_ids, attention_mask in batches:
                    self._queue.start_async({"input_ids": input_ids, "attention_mask": attention_mask}, list(rows))
            finally:
                self._queue.wait_all()
        if errors:
            raise errors[0]
