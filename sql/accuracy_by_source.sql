-- Rollout accuracy per problem source: how often pi_theta0's answer rollouts are verified correct, by dataset source and kind.
SELECT
    split_part(p.source, '/', 1) AS source,
    p.kind,
    count(DISTINCT v.prompt_idx) AS problems,
    count(DISTINCT (v.prompt_idx, v.sample_idx)) AS traces,
    count(*) AS rollouts,
    round(avg(v.correct::INTEGER), 4) AS accuracy,
    -- share of traces with at least one correct rollout: the ones the Acc estimator can select
    round(count(DISTINCT (v.prompt_idx, v.sample_idx)) FILTER (WHERE v.correct)
        / count(DISTINCT (v.prompt_idx, v.sample_idx)), 4) AS traces_any_correct,
    round(avg((v.status = 'no_answer')::INTEGER), 4) AS no_answer_rate,
    round(avg((v.status = 'gold_unparsable')::INTEGER), 4) AS gold_unparsable_rate
FROM verdicts AS v
JOIN problems AS p USING (prompt_idx)
GROUP BY ALL
ORDER BY source, p.kind;
