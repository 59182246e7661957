#!/usr/bin/env python3
"""The ONNX example on this machine's device: which execution provider it chose, and records/s through it.

Loads ``modalkit.examples.onnx_text.OnnxSentimentPipeline`` (building its model in a temporary folder), then runs
generated reviews through it in batches, and prints one JSON line: the providers ONNX Runtime has, the one the
pipeline chose at load time, records/s through the whole pipeline (preprocess, predict, postprocess) and through
``predict`` alone (the device's share). On a GPU machine, install ``onnxruntime-gpu`` in place of ``onnxruntime``
first; ``--device cuda`` then fails, naming the fix, where CUDA is missing.

    python scripts/device_check_onnx.py                       # auto: CUDA when there is one, else the CPU
    python scripts/device_check_onnx.py --device cpu --records 50000
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cpu-threads", type=int, default=1, help="ONNX Runtime's CPU threads (0: its default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import onnxruntime

    from modalkit.examples.onnx_text import OnnxSentimentPipeline
    from modalkit.examples.sentiment import Review, training_corpus

    with tempfile.TemporaryDirectory(prefix="onnx-device-check-") as folder:
        started = time.perf_counter()
        pipe = OnnxSentimentPipeline("sentiment-onnx", folder, {}, device=args.device, cpu_threads=args.cpu_threads)
        load_s = time.perf_counter() - started
    texts, _ = training_corpus(n_per_label=max(1, args.records // 3 + 1))
    reviews = [Review(text=t) for t in texts[: args.records]]
    batches = [reviews[i : i + args.batch_size] for i in range(0, len(reviews), args.batch_size)]
    pipe.run_inference(batches[0])  # warm-up: the first run on a GPU allocates and compiles
    predict_s = 0.0
    started = time.perf_counter()
    for batch in batches:
        pre = pipe.preprocess(batch)
        t0 = time.perf_counter()
        raw = pipe.predict(batch, pre)
        predict_s += time.perf_counter() - t0
        pipe.postprocess(batch, raw)
    wall = time.perf_counter() - started
    print(json.dumps({
        "onnxruntime": onnxruntime.__version__,
        "available_providers": onnxruntime.get_available_providers(),
        "provider": pipe.provider,
        "records": len(reviews),
        "batch_size": args.batch_size,
        "load_s": round(load_s, 3),
        "records_per_s": round(len(reviews) / wall),
        "predict_records_per_s": round(len(reviews) / predict_s),
        "predict_share_of_wall": round(predict_s / wall, 3),
    }), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
