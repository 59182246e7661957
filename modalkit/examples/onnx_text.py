"""Review sentiment on a real inference runtime: ONNX Runtime, on the GPU when there is one.

Copy this file to put a model exported to ONNX behind modalkit. What it shows beyond the sentiment example:

* the model is an ONNX graph run by ``onnxruntime.InferenceSession``; the execution provider (the device) is chosen
  once, at load time: ``CUDAExecutionProvider`` when this machine's ONNX Runtime has it (the ``onnxruntime-gpu``
  build on a GPU), else ``CPUExecutionProvider``; the choice is logged and kept in ``pipeline.provider``;
* which stages are host stages: ``device_stages = ("predict",)`` says only ``predict`` (the session) must run on
  the thread that loaded the model; ``preprocess`` (tokenizing, hashing, padding) and ``postprocess`` are plain
  CPU work that the engine may run on other threads or processes, so the device is fed while it works;
  ``host_stages()`` gives the tokenizing (:class:`OnnxTokens`: the bucket count, nothing of the session) to a
  worker's host processes (``job_config.host_workers``). A pipeline whose ``preprocess`` also touches the GPU
  declares ``("preprocess", "predict")``;
* the model file is built here on first load, without downloads: the sentiment example's naive Bayes weights
  (fitted from its generated corpus) written as an ONNX graph with the ``onnx`` helper API, saved as
  ``<all_model_data_folder>/<model_name>/model.onnx`` and loaded from there afterwards. A real model would ship
  that file (exported from PyTorch with ``torch.onnx.export``) in the model folder or on a Modal Volume.

The graph is an embedding bag: ``Gather`` each token's per-class log-probabilities, mask the padding, sum over the
tokens, add the class prior, ``Softmax``; label and score come out of the graph (``ArgMax``, ``ReduceMax``).

Needs the ``onnx`` extra: ``pip install 'modalkit[onnx]'`` (``onnxruntime`` and ``onnx``; on a GPU machine install
``onnxruntime-gpu`` in place of ``onnxruntime``). A model entry::

    model_entries:
      sentiment-onnx:
        pipeline: "modalkit.examples.onnx_text:OnnxSentimentPipeline"
        device: auto        # auto | cpu | cuda

Example:
    >>> import tempfile
    >>> from modalkit.examples.onnx_text import OnnxSentimentPipeline
    >>> from modalkit.examples.sentiment import Review
    >>> pipe = OnnxSentimentPipeline("sentiment-onnx", tempfile.mkdtemp(), {})
    >>> [o.label for o in pipe.run_inference([Review(text="Absolutely love it, great value"),
    ...                                       Review(text="Terrible. It broke after a day")])]
    ['positive', 'negative']
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, Field

from modalkit.examples.sentiment import LABELS, Review, Sentiment, fit, tokens, training_corpus
from modalkit.exceptions import ConfigError, DependencyError
from modalkit.inference_pipeline import InferencePipeline

if TYPE_CHECKING:
    import numpy as np

__all__ = ["OnnxSentimentParameters", "OnnxSentimentPipeline", "build_model", "choose_providers"]

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: the ONNX opset the graph is written for (every ONNX Runtime release since 1.12 runs it)
OPSET = 17
INSTALL_HINT = "pip install 'modalkit[onnx]' (on a GPU machine: onnxruntime-gpu in place of onnxruntime)"


def build_model(weights: dict[str, Any]) -> bytes:
    """The ONNX graph of the sentiment model's weights (``fit``'s arrays), serialized.

    Inputs: ``ids`` (int64, batch x tokens: hashed token ids, padded) and ``mask`` (float32, the same shape: 1 for a
    token, 0 for padding). Outputs: ``label`` (int64, batch) and ``score`` (float32, batch).
    """
    import numpy as np

    try:
        from onnx import TensorProto, checker, helper, numpy_helper
    except ImportError as exc:
        raise DependencyError(f"the onnx_text example builds its model with onnx: {INSTALL_HINT}") from exc
    initializers = [
        numpy_helper.from_array(np.asarray(weights["log_prob"], dtype=np.float32), "log_prob"),
        numpy_helper.from_array(np.asarray(weights["log_prior"], dtype=np.float32), "log_prior"),
        numpy_helper.from_array(np.asarray([2], dtype=np.int64), "axis_2"),
        numpy_helper.from_array(np.asarray([1], dtype=np.int64), "axis_1"),
    ]
    nodes = [
        helper.make_node("Gather", ["log_prob", "ids"], ["per_token"], axis=0),  # batch x tokens x labels
        helper.make_node("Unsqueeze", ["mask", "axis_2"], ["mask3"]),
        helper.make_node("Mul", ["per_token", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis_1"], ["summed"], keepdims=0),
        helper.make_node("Add", ["summed", "log_prior"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
        helper.make_node("ArgMax", ["prob"], ["label"], axis=1, keepdims=0),
        helper.make_node("ReduceMax", ["prob"], ["score"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "modalkit-sentiment",
        inputs=[
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "tokens"]),
        ],
        outputs=[
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modalkit")
    model.ir_version = 8  # the IR of opset 17: runtimes older than the onnx package still load it
    helper.set_model_props(model, {"n_features": str(np.asarray(weights["log_prob"]).shape[0])})
    checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def choose_providers(device: str, available: list[str]) -> list[str]:
    """The execution providers to ask ONNX Runtime for, best first, given what this build has.

    ``auto``: CUDA when available, else CPU; ``cuda``: CUDA, and an error naming the fix when it is missing;
    ``cpu``: CPU.

    Example:
        >>> choose_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])
        ['CUDAExecutionProvider', 'CPUExecutionProvider']
        >>> choose_providers("auto", ["CPUExecutionProvider"])
        ['CPUExecutionProvider']
    """
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise ConfigError(f"model entry device: cuda, but this ONNX Runtime has no {CUDA} (it has "
                          f"{', '.join(available)}); install onnxruntime-gpu on a GPU machine, "
                          "or set device: auto")  # fmt: skip
    return [CPU]


class OnnxSentimentParameters(BaseModel):
    """The keys of an ONNX sentiment model entry (``model_settings.model_entries.<name>``), besides ``pipeline``."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: the GPU (CUDAExecutionProvider) when ONNX Runtime has one, else the CPU."
    )
    model_file: str = Field(
        "model.onnx", min_length=1, description="File name under <all_model_data_folder>/<model_name>/."
    )
    n_features: int = Field(1 << 16, ge=16, le=1 << 22, description="Hash buckets when the model is built here.")
    cpu_threads: int = Field(
        1, ge=0, le=256, description="Threads ONNX Runtime uses on the CPU (0: its default, one per core); "
        "1 leaves the other cores to the host stages."
    )  # fmt: skip


class OnnxTokens:
    """The ONNX example's host stages: each review's hashed tokens, padded, and their mask."""

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features

    def preprocess(self, input_list: list[Review]) -> dict[str, np.ndarray]:
        import numpy as np

        buckets = self.n_features
        hashed = [[zlib.crc32(t.encode()) % buckets for t in tokens(item.text)] for item in input_list]
        lengths = np.fromiter((len(h) for h in hashed), dtype=np.int64, count=len(hashed))
        width = max(int(lengths.max(initial=0)), 1)
        mask = (np.arange(width) < lengths[:, None]).astype(np.float32)
        ids = np.zeros((len(hashed), width), dtype=np.int64)
        ids[mask.astype(bool)] = np.fromiter((t for h in hashed for t in h), dtype=np.int64, count=int(lengths.sum()))
        return {"ids": ids, "mask": mask}


class OnnxSentimentPipeline(InferencePipeline):
    """Sentiment of product reviews, run by ONNX Runtime. Its model entry keys are :class:`OnnxSentimentParameters`."""

    input_model = Review
    output_model = Sentiment
    parameters = OnnxSentimentParameters
    # only predict (the session) must run on the thread that loaded the model; preprocess and postprocess are host
    # stages (tokenizing and building output rows), free to run on other threads, and tokenizing in host processes
    # (host_stages)
    device_stages: ClassVar[tuple[str, ...]] = ("predict",)

    def __init__(
        self,
        model_name: str,
        all_model_data_folder: str,
        common_settings: dict[str, Any],
        *args: Any,
        device: str = "auto",
        model_file: str = "model.onnx",
        n_features: int = 1 << 16,
        cpu_threads: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name, all_model_data_folder, common_settings, *args, **kwargs)
        try:
            import numpy as np
            import onnxruntime as ort
        except ImportError as exc:
            raise DependencyError(f"the onnx_text example runs on onnxruntime: {INSTALL_HINT}") from exc
        self._np = np
        path = Path(all_model_data_folder) / model_name / model_file
        if path.is_file():
            model = path.read_bytes()
        else:
            model = build_model(fit(*training_corpus(), n_features=n_features))
            self._save(path, model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads
        options.log_severity_level = 3  # warnings of the runtime's own (unused providers) stay out of job logs
        providers = choose_providers(device, ort.get_available_providers())
        self.session = ort.InferenceSession(model, sess_options=options, providers=providers)
        #: the execution provider ONNX Runtime runs the model on (the device chosen at load time)
        self.provider: str = self.session.get_providers()[0]
        # the hash buckets the model was built with travel in its metadata (a shipped model may differ from the entry)
        self.n_features = int(self.session.get_modelmeta().custom_metadata_map.get("n_features", n_features))
        log.info("%s: ONNX Runtime %s on %s (asked for %s)", model_name, ort.__version__, self.provider, providers)

    def _save(self, path: Path, model: bytes) -> None:
        # a temporary name of its own: workers or containers sharing the folder may save at the same time
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(model)
            tmp.replace(path)
            log.info("built the ONNX sentiment model and saved it to %s", path)
        except OSError as exc:  # a read-only volume: run the model from memory
            log.warning("could not save the model to %s (%s); running it from memory", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def preprocess(self, input_list: list[Review]) -> dict[str, np.ndarray]:
        return OnnxTokens(self.n_features).preprocess(input_list)

    def host_stages(self) -> OnnxTokens:
        """The tokenizing, for a worker's host processes (``job_config.host_workers``): the bucket count the model
        was built with, nothing of the session or the device."""
        return OnnxTokens(self.n_features)

    def predict(self, input_list: list[Review], preprocessed_data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        label, score = self.session.run(["label", "score"], preprocessed_data)
        return {"label": label, "score": score}

    def postprocess(self, input_list: list[Review], raw_output: dict[str, np.ndarray]) -> list[Sentiment]:
        return [
            Sentiment(label=LABELS[label], score=round(score, 6))
            for label, score in zip(raw_output["label"].tolist(), raw_output["score"].tolist(), strict=True)
        ]
