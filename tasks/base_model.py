"""The base model stage: resolve `cfg.base_model` to a local Hugging Face folder (prepare the embedded one).

No table; its manifest (`model_dir`, fingerprint of the model identity) is what the finetune and evaluate
stages take as upstream. Cheap and idempotent, so it is never cached.
"""

from __future__ import annotations

from prefect import task

from variational import models
from variational.stage import logger
from variational.store import code_version, fingerprint


def fingerprint_of(cfg: dict, upstream: dict[str, dict] | None = None, round_: int = 1) -> str:
    return fingerprint(
        "base_model",
        code=code_version(models),
        config={"base_model": models.model_identity(cfg["base_model"])},
    )


@task(name="base_model")
def base_model_task(cfg: dict, upstream: dict[str, dict] | None = None, round_: int = 1) -> dict:
    model_dir = models.resolve_model(cfg["base_model"])
    logger().info("base model %s -> %s", cfg["base_model"], model_dir)
    return {
        "stage": "base_model",
        "fingerprint": fingerprint_of(cfg),
        "model_dir": model_dir,
        "path": model_dir,
    }
