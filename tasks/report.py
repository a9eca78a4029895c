"""The report stage: the run's markdown + PNG report (variational/report.py), published as a Prefect artifact."""

from __future__ import annotations

from prefect import task

from variational.report import publish_report, write_report


@task(name="report")
def report_task(cfg: dict, upstream: dict[str, dict]) -> str:
    """Not cached: it reads whatever the run's tables are now (cheap), after every stage above finished."""
    path = write_report(cfg["data_root"], cfg["name"])
    publish_report(path)
    return str(path)
