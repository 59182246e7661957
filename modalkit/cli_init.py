"""``modalkit init [DIR]``: a new project in one command, as the original modalkit's newer CLI makes it.

It writes three files that work together as they are: ``modalkit.yaml`` (the settings a project starts with,
commented), ``pipeline.py`` (a small pipeline to replace with your model, its record schemas declared) and
``app.py`` (the Modal app in the original modalkit's form: ``ModalConfig()``, a ``ModalService`` class and the web
endpoints). ``modalkit validate`` and ``modalkit batch`` run on them at once; ``modal deploy app.py`` deploys
them. An existing file is never overwritten: the command refuses and names it. CLI side.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

__all__ = ["STARTER_FILES", "run_init"]

CONFIG = """\
# modalkit settings: every key not written here takes its default (see modalkit's own modalkit.yaml for all of
# them, commented). Layer more files with MODALKIT_CONFIG=modalkit.yaml,prod.yaml; unknown keys are errors.

app_settings:
  # Modal app name = app_prefix + MODALKIT_APP_POSTFIX (default "-dev").
  app_prefix: "my-model"

  build_config:
    # Python packages shipped into the Modal image: modalkit, and the module holding your pipeline.
    local_python_sources: ["modalkit", "pipeline"]
    # Your pipeline's pip requirements (torch, transformers...).
    pip_packages: []

  deployment_config:
    # GPU per Modal container ("T4", "L4", "A100"...); empty = CPU only.
    gpu: null

  batch_config:
    # Most records handed to the pipeline at once (online batches and batch-job sub-batches).
    max_batch_size: 64

  queue_config:
    # Where --success-queue / --failure-queue records go: "local" (a SQLite file under local_path: read it with
    # `modalkit queue NAME`), "sqs" or "none".
    backend: "local"
    local_path: ".modalkit/queues"

  job_config:
    # Where batch chunks run: "local" (worker processes here) or "modal" (the deployed app's batch worker).
    backend: "local"
    # Input bytes per chunk ("64MiB" works).
    chunk_size: "32MiB"
    # Record field holding each record's id; empty = "<file key>:<position>".
    id_field: null
    # The job fails when more than this fraction of its records fail.
    max_failure_rate: 0.1

model_settings:
  # Folder holding every model's files (weights), passed to the pipeline's constructor.
  local_model_repository_folder: "./models"
  # Model used when none is named.
  default_model: "my-model"
  model_entries:
    my-model:
      # The pipeline class, by import path (pipeline.py beside this file); other keys go to its constructor.
      pipeline: "pipeline:StarterPipeline"
      long_text_words: 12
"""

PIPELINE = '''\
"""Your pipeline: replace the schemas and the three stages with your model's.

modalkit validates each record against ``input_model``, hands the pipeline batches of them (preprocess, predict,
postprocess), and writes one ``output_model`` per record. A record that fails fails alone.

    modalkit validate data/ results/    # the dry run: config, pipeline, input, a sample of records
    modalkit batch data/ results/       # every record under data/ (JSONL, CSV or Parquet)
    modalkit serve                      # the same pipeline over HTTP
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from modalkit.inference_pipeline import InferencePipeline
from modalkit.iomodel import InferenceOutputModel


class TextIn(BaseModel):
    """One input record: a JSON line, a CSV row, a Parquet row or an HTTP body (other fields are ignored)."""

    text: str = Field(min_length=1, description="The text to score.")


class TextOut(InferenceOutputModel):
    """One output (a batch job's part files add the record's id)."""

    label: str = Field(description="'long' or 'short'.")
    words: int = Field(ge=0, description="How many words the text has.")


class Parameters(BaseModel):
    """The model entry's keys in modalkit.yaml (a typo there fails before a job starts)."""

    long_text_words: int = Field(12, ge=1, description="Texts with at least this many words are 'long'.")


class StarterPipeline(InferencePipeline):
    """Counts words and labels texts long or short: a stand-in for your model."""

    input_model = TextIn
    output_model = TextOut
    parameters = Parameters

    def __init__(
        self, model_name: str, all_model_data_folder: str, common_settings: dict[str, Any], **kwargs: Any
    ) -> None:
        super().__init__(model_name, all_model_data_folder, common_settings, **kwargs)
        # load weights here, once per worker or container (heavy imports such as torch belong here too)
        self.long_text_words = int(kwargs.get("long_text_words", 12))

    def preprocess(self, input_list: list[TextIn]) -> dict[str, Any]:
        return {"words": [len(item.text.split()) for item in input_list]}

    def predict(self, input_list: list[TextIn], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        words = preprocessed_data["words"]
        return {"words": words, "long": [n >= self.long_text_words for n in words]}

    def postprocess(self, input_list: list[TextIn], raw_output: dict[str, Any]) -> list[TextOut]:
        return [
            TextOut(label="long" if long else "short", words=words)
            for words, long in zip(raw_output["words"], raw_output["long"], strict=True)
        ]
'''

APP = '''\
"""The Modal app, in the original modalkit's form: `modal deploy app.py` (settings from ./modalkit.yaml or
MODALKIT_CONFIG). The online class batches requests (batch_config); the web function serves the HTTP endpoints."""

# no `from __future__ import annotations`: Modal reads the modal.parameter() annotations at runtime
import modal

from modalkit.modal_config import ModalConfig
from modalkit.modal_service import ModalService, create_web_endpoints
from pipeline import StarterPipeline, TextIn, TextOut

modal_config = ModalConfig()
app = modal.App(name=modal_config.app_name)


@app.cls(**modal_config.get_app_cls_settings())
class Model(ModalService):
    inference_implementation = StarterPipeline
    model_name: str = modal.parameter(default="my-model")
    modal_utils: ModalConfig = modal_config


@app.function(**modal_config.get_handler_settings())
@modal.concurrent(**modal_config.get_handler_concurrent_settings())
@modal.asgi_app(**modal_config.get_asgi_app_settings())
def web_endpoints():
    return create_web_endpoints(app_cls=Model, input_model=TextIn, output_model=TextOut)
'''

#: What ``modalkit init`` writes, by file name.
STARTER_FILES = {"modalkit.yaml": CONFIG, "pipeline.py": PIPELINE, "app.py": APP}

err = Console(stderr=True, soft_wrap=True)


def run_init(directory: Path) -> int:
    """Write the starter files into ``directory`` (created if missing); returns the exit status: 0, or 2 when
    one of them exists already (nothing is written then)."""
    existing = [name for name in STARTER_FILES if (directory / name).exists()]
    if existing:
        err.print(
            f"[red]error:[/red] {escape(', '.join(str(directory / n) for n in existing))} exists already; "
            "modalkit init never overwrites a file: run it in a new directory (modalkit init DIR)",
            highlight=False,
        )
        return 2
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in STARTER_FILES.items():
            with open(directory / name, "x", encoding="utf-8") as fh:  # "x": never over a file made meanwhile
                fh.write(text)
    except OSError as exc:
        err.print(f"[red]error:[/red] cannot write the project into {escape(str(directory))}: {exc}", highlight=False)
        return 2
    where = "" if directory == Path(".") else f"cd {directory} && "
    print(f"wrote {', '.join(STARTER_FILES)} in {directory.resolve()}")
    print(f"next: {where}modalkit validate data/ results/   (put JSONL, CSV or Parquet records with a 'text' in data/)")
    return 0
