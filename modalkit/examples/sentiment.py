"""A small, real text classifier: review sentiment (negative / neutral / positive).

Copy this file to start your own pipeline. What it shows:

* the record schemas, ``input_model`` and ``output_model``, declared on the class;
* weights loaded once, in ``__init__``, from ``<all_model_data_folder>/<model_name>/weights.npz`` (a Modal Volume
  in the cloud), fitted and saved there on first use if absent, with no download from anywhere;
* heavy imports (numpy here; torch in a bigger model) inside ``__init__``, so importing the module is cheap;
* preprocess / predict / postprocess vectorised over the whole batch.

The model is multinomial naive Bayes over hashed word 1- and 2-grams (so "not good" is a feature of its own),
fitted on a corpus of templated reviews generated here from word lists, deterministically.

Example:
    >>> import tempfile
    >>> from modalkit.examples.sentiment import Review, SentimentPipeline
    >>> pipe = SentimentPipeline("sentiment", tempfile.mkdtemp(), {})
    >>> [o.label for o in pipe.run_inference([Review(text="Absolutely love it, great value"),
    ...                                       Review(text="Terrible. It broke after a day")])]
    ['positive', 'negative']
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import re
import uuid
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modalkit.inference_pipeline import InferencePipeline
from modalkit.iomodel import InferenceOutputModel

if TYPE_CHECKING:
    import numpy as np

__all__ = ["LABELS", "Review", "Sentiment", "SentimentParameters", "SentimentPipeline", "fit", "training_corpus"]

log = logging.getLogger(__name__)

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
_TOKEN = re.compile(r"[a-z0-9']+")


class Review(BaseModel):
    """One input record: the review text (and, in batch files, any other columns, which are ignored)."""

    model_config = ConfigDict(extra="ignore")

    text: str = Field(min_length=1, max_length=20_000, description="The review.")


class Sentiment(InferenceOutputModel):
    """One output: the label and the model's probability for it."""

    label: Literal["negative", "neutral", "positive"]
    score: float = Field(ge=0.0, le=1.0)


def tokens(text: str) -> list[str]:
    """Lower-cased words and their bigrams ("not good" -> ["not", "good", "not good"])."""
    words = _TOKEN.findall(text.lower())
    return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]


def _hashes(text: str, n_features: int) -> list[int]:
    return [zlib.crc32(t.encode()) % n_features for t in tokens(text)]


# --- training data -------------------------------------------------------------------------------------------

_POSITIVE = [
    "great",
    "excellent",
    "amazing",
    "wonderful",
    "fantastic",
    "good",
    "superb",
    "lovely",
    "perfect",
    "reliable",
    "sturdy",
    "comfortable",
    "delightful",
    "brilliant",
    "solid",
]
_NEGATIVE = [
    "terrible",
    "awful",
    "horrible",
    "bad",
    "poor",
    "useless",
    "broken",
    "flimsy",
    "disappointing",
    "cheap",
    "faulty",
    "noisy",
    "worst",
    "defective",
    "unreliable",
]
_NOUNS = [
    "product",
    "phone",
    "blender",
    "jacket",
    "laptop",
    "charger",
    "service",
    "book",
    "chair",
    "headset",
    "kettle",
    "backpack",
    "camera",
    "lamp",
    "mattress",
]
_NEUTRAL = [
    "The {n} arrived on {d}.",
    "I bought this {n} last {d}.",
    "The {n} comes in a {c} box.",
    "It is a {c} {n}.",
    "The {n} was delivered by courier on {d}.",
    "This {n} is the {c} version.",
    "Ordered the {n} for my office.",
    "The {n} weighs about {k} kilos.",
    "Got the {n} as a gift on {d}.",
]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_COLOURS = ["black", "white", "grey", "blue", "red", "green", "silver"]
_TEMPLATES = {
    "positive": [
        "The {n} is {p}.",
        "Absolutely love this {n}, {p} value.",
        "{P} {n}, would buy again.",
        "Really {p} and {p2}, highly recommend it.",
        "The {n} is not {q} at all.",
        "Great {n}, works well.",
        "It never feels {q}, simply {p}.",
        "Five stars, a {p} {n}.",
        "I love this {n}.",
        "Best {n} ever, {p}.",
        "Happy with the {n}, {p} and {p2}.",
    ],
    "negative": [
        "The {n} is {q}.",
        "Terrible {n}, it broke after a day.",
        "{Q} {n}, do not buy.",
        "Really {q} and {q2}, returning it.",
        "The {n} is not {p} at all.",
        "Waste of money, {q} {n}.",
        "It never worked, simply {q}.",
        "One star, a {q} {n}.",
        "I hate this {n}.",
        "Worst {n} ever, {q}.",
        "Unhappy with the {n}, {q} and {q2}.",
    ],
}


def training_corpus(n_per_label: int = 1500, seed: int = 7) -> tuple[list[str], list[int]]:
    """A labelled corpus of templated reviews, the same for the same arguments."""
    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[int] = []
    for label in LABELS:
        for _ in range(n_per_label):
            template = rng.choice(_NEUTRAL if label == "neutral" else _TEMPLATES[label])
            p, p2, q, q2 = rng.sample(_POSITIVE, 2) + rng.sample(_NEGATIVE, 2)
            text = template.format(
                n=rng.choice(_NOUNS),
                p=p,
                p2=p2,
                q=q,
                q2=q2,
                P=p.capitalize(),
                Q=q.capitalize(),
                d=rng.choice(_DAYS),
                c=rng.choice(_COLOURS),
                k=rng.randint(1, 20),
            )
            texts.append(text)
            labels.append(LABELS.index(label))
    return texts, labels


def fit(texts: list[str], labels: list[int], n_features: int = 1 << 16, alpha: float = 0.5) -> dict[str, Any]:
    """Fit multinomial naive Bayes; returns the arrays that ``weights.npz`` holds."""
    import numpy as np

    counts = np.zeros((n_features, len(LABELS)), dtype=np.float64)
    for text, label in zip(texts, labels, strict=True):
        np.add.at(counts[:, label], _hashes(text, n_features), 1.0)
    log_prob = np.log(counts + alpha) - np.log((counts + alpha).sum(axis=0, keepdims=True))
    prior = np.bincount(np.asarray(labels), minlength=len(LABELS)) / len(labels)
    return {
        "log_prob": log_prob.astype(np.float32),
        "log_prior": np.log(prior).astype(np.float32),
        "n_features": np.int64(n_features),
    }


# --- the pipeline --------------------------------------------------------------------------------------------


class SentimentParameters(BaseModel):
    """The keys of a sentiment model entry (``model_settings.model_entries.<name>``), besides ``pipeline``."""

    n_features: int = Field(1 << 16, ge=16, le=1 << 24, description="Hash buckets when the weights are fitted here.")
    weights_file: str = Field(
        "weights.npz", min_length=1, description="File name under <all_model_data_folder>/<model_name>/."
    )


class SentimentTokens:
    """The sentiment model's host stages: hashed word n-grams of each review, as (row, column) index arrays."""

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features

    def preprocess(self, input_list: list[Review]) -> dict[str, Any]:
        import numpy as np

        rows: list[int] = []
        cols: list[int] = []
        for i, item in enumerate(input_list):
            hashed = _hashes(item.text, self.n_features)
            cols.extend(hashed)
            rows.extend([i] * len(hashed))
        return {"rows": np.asarray(rows, dtype=np.int64), "cols": np.asarray(cols, dtype=np.int64)}


class SentimentPipeline(InferencePipeline):
    """Sentiment of product reviews. Its model entry keys are :class:`SentimentParameters`."""

    input_model = Review
    output_model = Sentiment
    parameters = SentimentParameters

    def __init__(
        self,
        model_name: str,
        all_model_data_folder: str,
        common_settings: dict[str, Any],
        *args: Any,
        n_features: int = 1 << 16,
        weights_file: str = "weights.npz",
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name, all_model_data_folder, common_settings, *args, **kwargs)
        import numpy as np  # heavy imports belong here, not at module level

        self._np = np
        path = Path(all_model_data_folder) / model_name / weights_file
        if path.is_file():
            weights = dict(np.load(path))
        else:
            weights = fit(*training_corpus(), n_features=n_features)
            self._save(path, weights)
        self.log_prob: np.ndarray = weights["log_prob"]
        self.log_prior: np.ndarray = weights["log_prior"]
        self.n_features = int(weights["n_features"])

    def _save(self, path: Path, weights: dict[str, Any]) -> None:
        # a temporary name of its own: containers (or local workers) sharing the folder may save at the same time
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npz")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._np.savez(tmp, **weights)
            tmp.replace(path)
            log.info("fitted the sentiment model and saved its weights to %s", path)
        except OSError as exc:  # a read-only volume: keep the fitted weights in memory
            log.warning("could not save weights to %s (%s); using them from memory", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def preprocess(self, input_list: list[Review]) -> dict[str, Any]:
        return SentimentTokens(self.n_features).preprocess(input_list)

    def host_stages(self) -> SentimentTokens:
        """The hashing, for a worker's host processes (``job_config.host_workers``): it needs only the bucket count."""
        return SentimentTokens(self.n_features)

    def predict(self, input_list: list[Review], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        np = self._np
        logits = np.tile(self.log_prior, (len(input_list), 1))
        np.add.at(logits, preprocessed_data["rows"], self.log_prob[preprocessed_data["cols"]])
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        return {"label": prob.argmax(axis=1), "score": prob.max(axis=1)}

    def postprocess(self, input_list: list[Review], raw_output: dict[str, Any]) -> list[Sentiment]:
        return [
            Sentiment(label=LABELS[label], score=round(score, 6))
            for label, score in zip(raw_output["label"].tolist(), raw_output["score"].tolist(), strict=True)
        ]
