"""The ``--backend`` / ``--calibration_file`` flags shared by the pipelines that encode (``encode``, ``eval``,
``build_hn``, ``serve``): their help and the ``from_pretrained`` arguments they become. Light on purpose:
importing it loads no training stack."""

from __future__ import annotations

from typing import Any, Dict, Optional

BACKEND_HELP = ("Inference backend: auto (default: the fastest near-lossless one on this CPU, measured once and "
                "cached), torch, or openvino (pip install 'retrievals[openvino]'); see docs/speed.md")
CALIBRATION_HELP = ("Documents (JSONL/Parquet corpus) to calibrate int8 on OpenVINO (--precision int8): a seeded "
                    "sample of them; default: a sample of the texts first encoded, or a saved int8 export")


def backend_kwargs(backend: Optional[str], calibration_file: Optional[str] = None) -> Dict[str, Any]:
    """``from_pretrained`` keyword arguments of the ``--backend`` / ``--calibration_file`` flags (int8 is
    calibrated on a seeded sample of the file's documents, as the encode job does on its corpus)."""
    from ..data.corpus import sample_texts

    options = {"calibration_texts": sample_texts(calibration_file)} if calibration_file else {}
    return {"backend": backend, **({"backend_kwargs": options} if options else {})}
