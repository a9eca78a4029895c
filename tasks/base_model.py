"""Stage `base_model`: resolve `base_model` to a local Hugging Face folder (preparing the embedded one).

No table: its ref (`model_dir`, a fingerprint of the model's identity) is what the fine-tunes start from and
what `eval` evaluates as "base". Cheap and idempotent, so it resolves every run.
"""

from __future__ import annotations

from variational.engines import models
from variational.pipeline.stage import Stage

BASE_MODEL = Stage(
    name="base_model",
    fields=("base_model",),
    code=("variational.engines.models",),
    resolve=lambda i: models.resolve_model(i.conf.base_model),
    identity=lambda i: {"model": models.model_identity(i.conf.base_model)},
    per_round=False,
)
