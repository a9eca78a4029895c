"""The `variational` flow: the recipe of method.md as one Prefect flow; it reads as the DAG of design.md.
(The file is not named variational.py: Prefect puts flows/ on sys.path to load a deployment's entrypoint,
and such a file would shadow the `variational` package.)

Each `run(STAGE, cfg, **inputs)` is one Prefect task that reuses the stage when its fingerprint's folder is
complete and computes it otherwise (variational/pipeline/runner.py); `runner.trace` walks this body
without computing anything, which is how the planner and the tests read the DAG. Rounds (`rounds: T`, Algorithm 1): round 1 is
the paper's recipe; in round t > 1 q_phi is updated by forward KL (Eq.9) on traces sampled from the round
t-1 policy, and that policy takes the place of pi_theta0.
"""

from __future__ import annotations

import json

from prefect import flow

from tasks.base_model import BASE_MODEL
from tasks.decontaminate import CLEAN_PROBLEMS, CONTAMINATION
from tasks.evaluate import EVAL
from tasks.finetune import PI_THETA, PI_THETA0, Q_PHI
from tasks.ingest import PROBLEMS
from tasks.rollouts import ROLLOUTS
from tasks.sample_posterior import POSTERIOR_SAMPLES
from tasks.sample_prior import PRIOR_SAMPLES
from tasks.score import LOGPS
from tasks.select import TRAIN
from tasks.verify import PRIOR_VERDICTS, VERDICTS
from tasks.weights import WEIGHTS
from variational.analysis.report import write_and_publish
from variational.pipeline.runner import Call, Ref, run, start_run, step, trace


def decontaminate(cfg: dict, problems: Ref) -> Ref:
    """`data.decontaminate`: off -> the problems; flag -> also the `contamination` table beside them; drop ->
    `clean_problems` (the problems minus the contaminated rows) in their place for every stage below."""
    mode = cfg["data"]["decontaminate"]
    if mode == "off":
        return problems
    found = run(CONTAMINATION, cfg, problems=problems)
    return run(CLEAN_PROBLEMS, cfg, problems=problems, contamination=found) if mode == "drop" else problems


def fit_posterior(cfg: dict, problems: Ref, base: Ref, policy: Ref, init: Ref | None, r: int) -> Ref:
    """q_phi: hinted SFT on the reference traces (paper's practice), or Eq.9 on traces sampled from `policy`."""
    if cfg["posterior_objective"] == "hinted_sft" and init is None:
        return run(Q_PHI, cfg, r, problems=problems, base_model=base)
    prior = run(PRIOR_SAMPLES, cfg, r, problems=problems, policy=policy)
    prior_verdicts = run(PRIOR_VERDICTS, cfg, r, prior_samples=prior, problems=problems)
    return run(
        Q_PHI,
        cfg,
        r,
        problems=problems,
        prior_samples=prior,
        prior_verdicts=prior_verdicts,
        base_model=base,
        init=init,
    )


@flow(name="variational", log_prints=True)
def variational(
    config: str | dict = "configs/tiny.yaml", overrides: list[str] | None = None, data_root: str | None = None
) -> dict:
    """`config`: a YAML path or name (deployments), or the config the CLI has already validated.
    `data_root`: where the run reads and writes, before `overrides` (`variational serve --data-root D` sets
    it on its deployments, so a run's own `--param overrides=[...]` keeps it); None: the config's."""
    # as JSON: a YAML string whatever the path holds (`: `, `#`, a leading `*`)
    root = [f"data_root={json.dumps(data_root)}"] if data_root else []
    cfg = start_run(config, [*root, *(overrides or [])])
    problems = decontaminate(cfg, run(PROBLEMS, cfg))
    base = run(BASE_MODEL, cfg)
    pi_theta0 = run(PI_THETA0, cfg, problems=problems, base_model=base)
    q_phi = fit_posterior(cfg, problems, base, pi_theta0, None, 1)
    policy = pi_theta = pi_theta0
    for r in range(1, cfg["rounds"] + 1):
        if r > 1:  # EM: the last policy scores and answers; q_phi follows it by forward KL
            policy = pi_theta
            q_phi = fit_posterior(cfg, problems, base, policy, q_phi, r)
        samples = run(POSTERIOR_SAMPLES, cfg, r, problems=problems, q_phi=q_phi)
        logps = run(
            LOGPS, cfg, r, problems=problems, posterior_samples=samples, pi_theta0=policy, q_phi=q_phi
        )
        rollouts = run(ROLLOUTS, cfg, r, problems=problems, posterior_samples=samples, pi_theta0=policy)
        verdicts = run(VERDICTS, cfg, r, rollouts=rollouts, problems=problems)
        weights = run(
            WEIGHTS, cfg, r, problems=problems, posterior_samples=samples, logps=logps, verdicts=verdicts
        )
        train = run(
            TRAIN,
            cfg,
            r,
            problems=problems,
            weights=weights,
            posterior_samples=samples,
            rollouts=rollouts,
            verdicts=verdicts,
        )
        pi_theta = run(PI_THETA, cfg, r, train=train, base_model=base, init=pi_theta if r > 1 else None)
    if cfg["eval"]["enabled"]:
        run(EVAL, cfg, base_model=base, pi_theta0=pi_theta0, pi_theta=pi_theta)
    return {"pi_theta": pi_theta, "train": train, "report": step("report", write_and_publish, cfg)}


def dag(config: str | dict, overrides: list[str] | None = None) -> list[Call]:
    """The stages this flow runs for `config`, in order, with their fingerprints; nothing is computed."""
    return trace(variational.fn, config, overrides)
