-- Per question and estimator: how many traces are eligible, the largest normalised weight rho_tilde, the effective sample size 1/sum(rho_tilde^2), and the selected sample.
SELECT
    prompt_idx,
    estimator,
    count(*) AS samples,
    count(*) FILTER (WHERE eligible) AS n_eligible,
    round(max(rho_tilde), 4) AS max_rho_tilde,
    -- ESS is 1 when one trace takes all the weight and n_eligible when the weights are uniform
    round(1.0 / nullif(sum(rho_tilde * rho_tilde), 0), 3) AS effective_sample_size,
    min(sample_idx) FILTER (WHERE selected) AS selected_sample,
    round(max(log_rho) FILTER (WHERE selected), 4) AS selected_log_rho
FROM weights
GROUP BY prompt_idx, estimator
ORDER BY prompt_idx, estimator;
