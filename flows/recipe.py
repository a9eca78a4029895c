"""The `variational` flow: the recipe of method.md as one Prefect flow; it reads as the DAG of design.md.
(The file is not named variational.py: Prefect puts flows/ on sys.path to load a deployment's entrypoint,
and such a file would shadow the `variational` package.)

Every stage is a cached task keyed by its fingerprint (never the run id), so a new run of the same config
reuses every finished stage and shard, and a changed field recomputes only what depends on it.
Rounds (`rounds: T`, Algorithm 1): round 1 is the paper's recipe; in round t > 1 q_phi is updated by
forward KL (Eq.9) on traces sampled from the round t-1 policy, and that policy takes the place of pi_theta0.
"""

from __future__ import annotations

from prefect import flow

from tasks.base_model import base_model_task
from tasks.evaluate import evaluate_task
from tasks.finetune import final_sft_task, finetune_pi_theta0_task, finetune_q_phi_task
from tasks.ingest import ingest_task
from tasks.report import report_task
from tasks.rollouts import rollouts_task
from tasks.sample_posterior import sample_posterior_task
from tasks.sample_prior import sample_prior_task
from tasks.score import score_task
from tasks.select import select_task
from tasks.verify import verify_prior_task, verify_task
from tasks.weights import weights_task
from variational.config import load_config


def fit_posterior(
    cfg: dict, problems: dict, policy: dict, init: dict | None, r: int, done: list[dict]
) -> dict:
    """q_phi: hinted SFT on the reference traces (paper's practice), or Eq.9 on traces sampled from `policy`."""
    if cfg["posterior_objective"] == "hinted_sft" and init is None:
        q_phi = finetune_q_phi_task(cfg, {"problems": problems}, r)
    else:
        prior = sample_prior_task(cfg, {"problems": problems, "policy": policy}, r)
        prior_verdicts = verify_prior_task(cfg, {"prior_samples": prior, "problems": problems}, r)
        upstream = {"problems": problems, "prior_samples": prior, "prior_verdicts": prior_verdicts}
        q_phi = finetune_q_phi_task(cfg, upstream | ({"init": init} if init else {}), r)
        done += [prior, prior_verdicts]
    done.append(q_phi)
    return q_phi


@flow(name="variational", log_prints=True)
def variational(config: str = "configs/tiny.yaml", overrides: list[str] | None = None) -> dict:
    cfg = load_config(config, overrides or []).model_dump(mode="json")
    problems = ingest_task(cfg, {})
    base = base_model_task(cfg)
    pi_theta0 = finetune_pi_theta0_task(cfg, {"problems": problems})
    done = [problems, pi_theta0]
    q_phi = fit_posterior(cfg, problems, pi_theta0, None, 1, done)
    policy = pi_theta = pi_theta0
    for r in range(1, cfg["rounds"] + 1):
        if r > 1:  # EM: the last policy scores and answers; q_phi follows it by forward KL
            policy = pi_theta
            q_phi = fit_posterior(cfg, problems, policy, q_phi, r, done)
        samples = sample_posterior_task(cfg, {"problems": problems, "q_phi": q_phi}, r)
        scored = {"problems": problems, "posterior_samples": samples}
        logps = score_task(cfg, scored | {"pi_theta0": policy, "q_phi": q_phi}, r)
        rollouts = rollouts_task(cfg, scored | {"pi_theta0": policy}, r)
        verdicts = verify_task(cfg, {"rollouts": rollouts, "problems": problems}, r)
        weights = weights_task(cfg, scored | {"logps": logps, "verdicts": verdicts}, r)
        train = select_task(cfg, scored | {"weights": weights, "rollouts": rollouts, "verdicts": verdicts}, r)
        pi_theta = final_sft_task(cfg, {"train": train} | ({"init": pi_theta} if r > 1 else {}), r)
        done += [samples, logps, rollouts, verdicts, weights, train, pi_theta]
    if cfg["eval"]["enabled"]:
        done.append(evaluate_task(cfg, {"base": base, "pi_theta0": pi_theta0, "pi_theta": pi_theta}))
    report = report_task(cfg, done)
    return {"pi_theta": pi_theta, "train": train, "report": report}
