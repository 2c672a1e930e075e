"""One encode variant of ``benchmarks/peers.py`` in its own process (and its own environment: the peers'
rows run in the peers' venv, ours in ours). Standalone: it imports only what its variant needs.

Protocol (JSON lines): it prints ``{"ready": load_seconds}`` once loaded, then for each command read on
stdin, ``{"cmd": "run", "set": "long"|"short"|"corpus"|"queries", "save": path|null}``, encodes that set
and answers ``{"seconds": s}`` (the vectors saved as .npy when asked); ``{"cmd": "quit"}`` ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np


def peer_model(variant: str, model_dir: str, work: str, calibration: list, vnni: bool):
    import torch
    from sentence_transformers import SentenceTransformer

    if variant == "st_torch_fp32":
        return SentenceTransformer(model_dir, device="cpu")
    if variant == "st_torch_bf16":
        return SentenceTransformer(model_dir, device="cpu").to(torch.bfloat16)
    if variant == "st_openvino_fp32":
        return SentenceTransformer(model_dir, device="cpu", backend="openvino",
                                   model_kwargs={"ov_config": {"INFERENCE_PRECISION_HINT": "f32"}})
    if variant == "st_openvino_default":
        return SentenceTransformer(model_dir, device="cpu", backend="openvino")
    if variant == "st_onnx_fp32":
        return SentenceTransformer(model_dir, device="cpu", backend="onnx")
    copy = os.path.join(work, variant)  # exports are written into the model folder: one copy per variant
    if not os.path.exists(copy):
        shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns("openvino", "onnx"))
    if variant == "st_openvino_int8":
        from optimum.intel import OVQuantizationConfig
        from sentence_transformers import export_static_quantized_openvino_model

        data = os.path.join(work, "calibration")  # offline: a local dataset folder of the user's documents
        os.makedirs(data, exist_ok=True)
        with open(os.path.join(data, "train.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in calibration)
        model = SentenceTransformer(copy, device="cpu", backend="openvino")
        export_static_quantized_openvino_model(model, OVQuantizationConfig(num_samples=len(calibration)), copy,
                                               dataset_name=data, dataset_config_name="default", dataset_split="train",
                                               column_name="text")
        return SentenceTransformer(copy, device="cpu", backend="openvino",
                                   model_kwargs={"file_name": "openvino/openvino_model_qint8_quantized.xml"})
    if variant == "st_onnx_o3":
        from sentence_transformers import export_optimized_onnx_model

        export_optimized_onnx_model(SentenceTransformer(copy, device="cpu", backend="onnx"), "O3", copy)
        return SentenceTransformer(copy, device="cpu", backend="onnx", model_kwargs={"file_name": "onnx/model_O3.onnx"})
    if variant == "st_onnx_int8":
        from sentence_transformers import export_dynamic_quantized_onnx_model

        config = "avx512_vnni" if vnni else "avx2"
        export_dynamic_quantized_onnx_model(SentenceTransformer(copy, device="cpu", backend="onnx"), config, copy)
        return SentenceTransformer(copy, device="cpu", backend="onnx",
                                   model_kwargs={"file_name": f"onnx/model_qint8_{config}.onnx"})
    raise SystemExit(f"unknown variant {variant}")


def our_model(variant: str, model_dir: str, work: str, calibration: list):
    from retrievals import AutoModelForEmbedding

    export = {"export_dir": os.path.join(work, variant)}
    if variant == "ours_torch":
        return AutoModelForEmbedding.from_pretrained(model_dir, backend="torch")
    if variant == "ours_openvino":
        return AutoModelForEmbedding.from_pretrained(model_dir, backend="openvino", backend_kwargs=export)
    if variant == "ours_auto":
        return AutoModelForEmbedding.from_pretrained(model_dir, backend="auto")
    if variant == "ours_int8":
        return AutoModelForEmbedding.from_pretrained(model_dir, precision="int8", backend="openvino",
                                                     backend_kwargs={**export, "calibration_texts": calibration})
    raise SystemExit(f"unknown variant {variant}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--texts", required=True, help="JSON: {long, short, corpus, queries, calibration}")
    parser.add_argument("--work", required=True)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--vnni", action="store_true")
    args = parser.parse_args()
    with open(args.texts, encoding="utf-8") as f:
        sets = json.load(f)
    start = time.perf_counter()
    ours = args.variant.startswith("ours")
    if ours:
        model = our_model(args.variant, args.model, args.work, sets["calibration"])
    else:
        model = peer_model(args.variant, args.model, args.work, sets["calibration"], args.vnni)

    def encode(texts, is_query):
        if ours:
            return model.encode(texts, batch_size=args.batch_size, is_query=is_query)
        return model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)

    encode(sets["short"][:300], True)  # warm-up, and for ours_auto the backend choice (>= 256 texts) or its cache
    print(json.dumps({"ready": round(time.perf_counter() - start, 2)}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        texts = sets[cmd["set"]]
        begin = time.perf_counter()
        vectors = np.asarray(encode(texts, cmd["set"] in ("short", "queries")), dtype=np.float32)
        seconds = time.perf_counter() - begin
        if cmd.get("save"):
            np.save(cmd["save"], vectors)
        print(json.dumps({"seconds": round(seconds, 4)}), flush=True)


if __name__ == "__main__":
    main()
