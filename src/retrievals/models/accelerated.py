"""The model side of :mod:`retrievals.backends`: which backend runs an :class:`AutoModelForEmbedding`'s
inference, its export (keyed by the model's fingerprint), int8 calibration on the user's documents, and
the ``auto`` measurement. :meth:`AutoModelForEmbedding.encode_ids` asks :func:`backend_runner` for a
runner and falls back to the torch forward when there is none.

Rules: a model on a GPU, quantised by bitsandbytes, with LoRA adapters not merged, or in training mode
runs on torch. A model whose weights changed in memory since its export is exported again when the user
asked for the backend by name, and runs on torch under ``auto`` (it is being trained: no export per
evaluation). Int8 under ``auto`` is OpenVINO's static int8 where the ``openvino`` and ``nncf`` packages are
installed (more faithful and faster than torch's dynamic int8, docs/speed.md), else torch's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import threading
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..backends import AUTO_MAX_PARAMETERS, canonical_backend, is_available
from ..backends import auto as auto_choice
from ..backends.store import export_folder, locked, read_record, write_record

logger = logging.getLogger(__name__)

AUTO_MIN_TEXTS = 256  # under auto, a call this large (or a cached choice) decides the backend
SAMPLE_TEXTS = 64  # texts the auto measurement runs, spread over the call's lengths
CALIBRATION_DOCUMENTS = 128
MIN_CALIBRATION = 32
BACKEND_OPTIONS = ("export_dir", "calibration_texts", "streams")


class ExportForward(nn.Module):
    """``(input_ids, attention_mask) -> pooled float32 [batch, dim]``: the model's own forward and pooling,
    with positions counted from each text's first real token under left padding (as ``_pooled`` does)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.positions = model._needs_position_ids(torch.tensor([[0, 1]]))
        self.no_cache = getattr(model.model.config, "use_cache", None) is not None  # decoders: no KV cache in the graph

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"position_ids": (attention_mask.cumsum(dim=1) - 1).clamp(min=0)} if self.positions else {}
        if self.no_cache:
            kwargs["use_cache"] = False
        outputs = self.model.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        return self.model.pooling(hidden.float(), attention_mask)


@contextlib.contextmanager
def eager_attention(backbone):
    """Plain attention ops while tracing: the fused SDPA path of decoders traces to a graph that gives NaN
    rows under left padding; OpenVINO fuses the plain ops itself."""
    before = getattr(backbone.config, "_attn_implementation", None)
    switch = hasattr(backbone, "set_attn_implementation") and before not in (None, "eager")
    if switch:
        backbone.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            backbone.set_attn_implementation(before)


def configure(model, backend: Optional[str], options: Optional[Dict[str, Any]], source_dir: Optional[str],
              quantization: Optional[str] = None) -> bool:
    """Record the backend on ``model``; returns whether int8 should be torch's dynamic quantisation."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown backend_kwargs {unknown}; valid: {', '.join(BACKEND_OPTIONS)}")
    model.backend = canonical_backend(backend or os.environ.get("RETRIEVALS_BACKEND"))
    model.backend_options = options
    model.source_dir = source_dir
    if model.backend == "openvino" and not is_available("openvino"):
        raise ImportError("backend='openvino' needs the openvino package: pip install 'retrievals[openvino]'")
    model.int8_backend = "torch"
    if quantization == "int8":
        # under auto, OpenVINO's int8 when it has documents to calibrate on, or a saved int8 graph
        ready = model.backend == "auto" and is_available("openvino") and is_available("nncf") and (
            bool(options.get("calibration_texts")) or not needs_calibration(model, assume="openvino", quantization="int8"))
        model.int8_backend = "openvino" if model.backend == "openvino" or ready else "torch"
        if model.backend == "auto" and model.int8_backend == "torch" and is_available("openvino"):
            logger.info("int8: torch's dynamic int8; OpenVINO's static int8 (faster, closer to fp32) needs documents "
                        "to calibrate on: backend_kwargs={'calibration_texts': [...]} or --calibration_file")
    return model.int8_backend == "torch"


def _lock(model) -> threading.Lock:
    lock = model.__dict__.get("_backend_lock")
    if lock is None:
        lock = model.__dict__.setdefault("_backend_lock", threading.Lock())
    return lock


def backend_runner(model, ids: Sequence[Sequence[int]]):
    """The runner for this call, or None for the torch forward."""
    from .lora import is_peft_model

    backend = getattr(model, "backend", "torch")
    quantization = getattr(model, "quantization", None)
    if backend == "torch" or model.device.type != "cpu" or model.training or is_peft_model(model.model) \
            or quantization not in (None, "int8") or (quantization == "int8" and model.int8_backend != "openvino"):
        return None
    if backend == "auto" and quantization is None and (
            not is_available("openvino") or sum(p.numel() for p in model.model.parameters()) > AUTO_MAX_PARAMETERS):
        return None
    from .loading import weights_state

    with _lock(model):
        state = weights_state(model.model)
        runner = model.__dict__.get("runner")
        if runner is not None and model.runner_weights == state:
            return runner
        if runner is not None and backend == "auto" and quantization is None:
            return None  # trained since the export: torch until the model is saved and loaded again
        built = None
        if backend == "auto" and quantization is None:
            choice = model.__dict__.get("backend_choice")
            if choice is None:
                choice, built = _choose(model, ids)
            if choice is None or choice == "torch":
                return None
        model.runner = built or _build(model, ids)
        model.runner_weights = state
        return model.runner


def needs_calibration(model, assume: Optional[str] = None, quantization: Optional[str] = None) -> bool:
    """Whether the model's first encode would calibrate int8 on OpenVINO (no saved int8 graph to reuse)."""
    from ..backends import openvino as ov_backend
    from .fingerprint import model_fingerprint

    int8_backend = assume or model.int8_backend
    quantization = quantization or getattr(model, "quantization", None)
    if quantization != "int8" or int8_backend != "openvino" or model.__dict__.get("runner"):
        return False
    fingerprint = model_fingerprint(model, with_variant=False)
    folder = export_folder("openvino", model.source_dir, fingerprint, model.backend_options.get("export_dir"))
    record = read_record(folder)
    return not (record.get("fingerprint") == fingerprint and record.get("int8")
                and os.path.exists(os.path.join(folder, ov_backend.INT8_NAME)))


def prepare_backend(model, texts: Optional[Sequence[str]] = None):
    """Resolve the model's backend now (export, calibrate int8 on ``texts``, or measure ``auto``) instead
    of at the first large encode; returns the runner, or None for torch."""
    if texts and getattr(model, "quantization", None) == "int8" and not model.backend_options.get("calibration_texts"):
        model.backend_options = {**model.backend_options, "calibration_texts": list(texts)}
    return backend_runner(model, model.tokenize(list(texts)) if texts else [])


def _precision(model) -> str:
    from .precision import resolve_precision

    return resolve_precision(model.precision, torch.device("cpu"), owner=model)


def _choice_key(model) -> str:
    import openvino

    settings = {k: v for k, v in model.model.config.to_dict().items() if k not in ("_name_or_path", "_commit_hash")}
    digest = hashlib.sha256(json.dumps([settings, model.embedding_config.pooling_method], sort_keys=True,
                                       default=str).encode()).hexdigest()[:12]
    from .precision import cpu_class

    return (f"{cpu_class()}|threads={torch.get_num_threads()}|{_precision(model)}|torch={torch.__version__}|"
            f"openvino={openvino.__version__}|{digest}")


def _sample(ids: Sequence[Sequence[int]], count: int, seed: int = 0) -> List[Sequence[int]]:
    """``count`` texts spread evenly over the call's lengths (sorted), so a sample is as long as the call."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    if len(order) <= count:
        return [ids[i] for i in order]
    step = len(order) / count
    return [ids[order[int(k * step)]] for k in range(count)]


def _choose(model, ids: Sequence[Sequence[int]]):
    """``(choice, runner built while measuring or None)``; ``(None, None)`` while undecided."""
    key = _choice_key(model)
    runner = None
    record = auto_choice.cached_choice(key)
    if record is None:
        if len(ids) < AUTO_MIN_TEXTS:
            return None, None
        sample = _sample(ids, SAMPLE_TEXTS)
        with torch.inference_mode():
            reference = model.encode_ids(sample, precision="fp32", backend="torch").numpy()
        runner = _build(model, ids)
        out = np.empty_like(reference)
        candidates = {"torch": lambda: model.encode_ids(sample, backend="torch").numpy(),
                      "openvino": lambda: run(model, runner, sample, out).copy()}
        record = auto_choice.measure(candidates, reference, len(sample))
        record["precision"] = _precision(model)
        auto_choice.save_choice(key, record)
        logger.info("backend auto on %s: %s (texts/s %s, min cosine %s)", key.split("|")[0], record["choice"],
                    record["texts_per_second"], record["min_cosine"])
    model.backend_choice = record["choice"]
    return record["choice"], runner


def _build(model, ids: Sequence[Sequence[int]]):
    """Export (or reuse) the graph, quantise to int8 if asked, compile it."""
    from ..backends import openvino as ov_backend
    from .fingerprint import model_fingerprint

    options = model.backend_options
    fingerprint = model_fingerprint(model, with_variant=False)
    folder = export_folder("openvino", model.source_dir, fingerprint, options.get("export_dir"))
    with locked(folder):
        record = read_record(folder)
        graph = os.path.join(folder, ov_backend.GRAPH_NAME)
        if record.get("fingerprint") != fingerprint or not os.path.exists(graph):
            logger.info("Exporting the model to OpenVINO in %s", folder)
            example = pad_numpy([[model.tokenizer.pad_token_id or 0] * 3, [1] * 2], model)
            with eager_attention(model.model):
                ov_backend.export(ExportForward(model), folder, {k: torch.as_tensor(v) for k, v in example.items()})
            record = {"fingerprint": fingerprint, "graph": ov_backend.GRAPH_NAME, "torch": torch.__version__}
            write_record(folder, record)
        path = _int8_graph(model, ids, folder, record, graph) if model.quantization == "int8" else graph
    return ov_backend.OpenVINORunner(path, precision=_precision(model), streams=options.get("streams"),
                                     threads=torch.get_num_threads())


def _int8_graph(model, ids, folder: str, record: Dict[str, Any], graph: str) -> str:
    from ..backends import openvino as ov_backend

    texts = model.backend_options.get("calibration_texts")
    int8_path = os.path.join(folder, ov_backend.INT8_NAME)
    saved = record.get("int8") or {}
    if texts:
        calibration = model.tokenize(list(texts)[:CALIBRATION_DOCUMENTS])
        source = f"calibration_texts ({len(calibration)} documents)"
    elif saved and os.path.exists(int8_path):
        return int8_path
    elif len(ids) >= MIN_CALIBRATION:
        rng = random.Random(0)
        calibration = [ids[i] for i in sorted(rng.sample(range(len(ids)), min(CALIBRATION_DOCUMENTS, len(ids))))]
        source = f"a seeded sample of {len(calibration)} of the {len(ids)} texts first encoded"
    else:
        raise ValueError(
            f"int8 on OpenVINO is calibrated on your documents, and none are known yet: pass "
            f"backend_kwargs={{'calibration_texts': [...]}} (>= {MIN_CALIBRATION} documents), export first with "
            f"`retrievals export --quantization int8 --calibration_file corpus.jsonl`, or encode at least "
            f"{MIN_CALIBRATION} documents in the first call (this one has {len(ids)})")
    sha = hashlib.sha256(json.dumps([list(map(int, x)) for x in calibration]).encode()).hexdigest()[:16]
    if saved.get("sha256") != sha or not os.path.exists(int8_path):
        logger.info("Quantising the OpenVINO graph to int8 on %s", source)
        ov_backend.quantize(graph, [pad_numpy([x], model) for x in calibration], int8_path)
        record["int8"] = {"sha256": sha, "documents": len(calibration), "source": source}
        write_record(folder, record)
    return int8_path


def pad_numpy(sequences: Sequence[Sequence[int]], model) -> Dict[str, np.ndarray]:
    """``input_ids`` / ``attention_mask`` int64 arrays padded on the model's side (:func:`pad_batch`)."""
    from .tokenization import pad_batch

    padded = pad_batch(sequences, model.tokenizer.pad_token_id or 0, model.embedding_config.padding_side)
    return {name: tensor.numpy() for name, tensor in padded.items()}


def run(model, runner, ids: Sequence[Sequence[int]], out: np.ndarray,
        batches: Optional[List[List[int]]] = None) -> np.ndarray:
    """Pooled vectors of ``ids`` into ``out`` through ``runner`` (batches: the model's token-budget ones)."""
    from .tokenization import DEFAULT_CPU_BATCH_TOKENS, MIN_FILL, length_sorted_batches, spread_batches

    if batches is None:
        batches = list(length_sorted_batches([len(x) for x in ids], 32, DEFAULT_CPU_BATCH_TOKENS, MIN_FILL))
    batches = spread_batches(batches, getattr(runner, "requests", 1), [len(x) for x in ids])

    def inputs():
        for batch in batches:
            padded = pad_numpy([ids[i] for i in batch], model)
            yield batch, padded["input_ids"], padded["attention_mask"]

    runner.encode(inputs(), out)
    return out
