"""The Modal app that ``modal deploy -m modalkit.modal_app`` deploys, built from your settings.

Two classes, both loading the configured model once per container, and a web function:

* ``Model``: the online class (``ModalService``, dynamic batching with ``batch_config``);
* ``BatchWorker``: runs batch-job chunks; ``modalkit batch --backend modal`` and the ``batch-inference`` flow look
  it up by name in the deployed app (``modal.Cls.from_name(app_name, "BatchWorker")``);
* ``web``: the HTTP endpoints (``modalkit.fast_api``) in a CPU container of their own, ``@modal.concurrent``; each
  request goes to ``Model`` as one input (``.remote.aio``), so Modal batches them; async ones are spawned and
  ``GET /jobs/{id}`` polls their ``FunctionCall``. A batched class may hold no other method, and
  ``@modal.batched`` cannot sit with ``@modal.asgi_app``: hence the separate function.

Settings are read when this module is imported (it is an app entry point, not part of ``import modalkit``):
``MODALKIT_CONFIG`` or ``./modalkit.yaml``. The files are shipped into the image, so the containers read the same.
Give the containers S3/SQS credentials with a Modal secret named in ``deployment_config.secrets``.

    MODALKIT_CONFIG=modalkit.yaml,prod.yaml modal deploy -m modalkit.modal_app
"""

# no `from __future__ import annotations` here: Modal reads the class annotations of modal.parameter() at runtime
from typing import Any

import modal

from modalkit.modal_config import ModalConfig
from modalkit.modal_service import BatchWorker as BatchWorkerBase
from modalkit.modal_service import ModalService

modal_config = ModalConfig()
DEFAULT_MODEL = modal_config.model_settings.entry()[0]

app = modal.App(name=modal_config.app_name)


@app.cls(**modal_config.get_app_cls_settings())
class Model(ModalService):
    """The online model class: one ``process_request`` batch at a time, per container."""

    model_name: str = modal.parameter(default=DEFAULT_MODEL)
    modal_utils: ModalConfig = modal_config


@app.cls(**modal_config.get_batch_worker_cls_settings())
class BatchWorker(BatchWorkerBase):
    """Runs one batch-job chunk per call: reads its input from S3, writes its results, returns counts."""

    model_name: str = modal.parameter(default=DEFAULT_MODEL)
    modal_utils: ModalConfig = modal_config


@app.function(**modal_config.get_handler_settings())
@modal.concurrent(**modal_config.get_handler_concurrent_settings())
@modal.asgi_app(**modal_config.get_asgi_app_settings())
def web() -> Any:
    """The HTTP endpoints of the default model (its pipeline's declared schemas)."""
    from modalkit.fast_api import create_web_endpoints
    from modalkit.inference_pipeline import import_pipeline

    entry = modal_config.model_settings.entry()[1]
    if entry.pipeline is None:
        raise RuntimeError("the default model entry names no pipeline; write your own web function")
    input_model, output_model = import_pipeline(entry.pipeline).require_schemas()
    return create_web_endpoints(app_cls=Model, input_model=input_model, output_model=output_model)
