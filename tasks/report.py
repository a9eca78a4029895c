"""The report stage: record the run's stages in run.json, then write the markdown + PNG report
(variational/report.py) and publish it as a Prefect artifact."""

from __future__ import annotations

from prefect import task

from variational.report import publish_report, write_report
from variational.stage import record_run


@task(name="report")
def report_task(cfg: dict, manifests: list[dict]) -> str:
    """Not cached: cheap, and it must see every stage of this run, cache hits included."""
    record_run(cfg, manifests)
    path = write_report(cfg["data_root"], cfg["name"])
    publish_report(path)
    return str(path)
