"""The Modal app that ``modal deploy -m modalkit.modal_app`` deploys, built from your settings.

Two classes, both loading the configured model once per container:

* ``Model``: the online class (``ModalService``, dynamic batching with ``batch_config``);
* ``BatchWorker``: runs batch-job chunks; ``modalkit batch --backend modal`` and the ``batch-inference`` flow look
  it up by name in the deployed app (``modal.Cls.from_name(app_name, "BatchWorker")``).

Settings are read when this module is imported (it is an app entry point, not part of ``import modalkit``):
``MODALKIT_CONFIG`` or ``./modalkit.yaml``. The files are shipped into the image, so the containers read the same.
Give the containers S3/SQS credentials with a Modal secret named in ``deployment_config.secrets``.

    MODALKIT_CONFIG=modalkit.yaml,prod.yaml modal deploy -m modalkit.modal_app
"""

# no `from __future__ import annotations` here: Modal reads the class annotations of modal.parameter() at runtime
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
