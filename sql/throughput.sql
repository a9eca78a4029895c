-- Throughput per stage and round from the shard stats: work, seconds, engine starts, tokens/s, device.
SELECT
    stage,
    round,
    count(*) AS shards,
    sum(rows_out) AS rows_out,
    sum(tokens_in) AS tokens_in,
    sum(tokens_out) AS tokens_out,
    round(sum(seconds), 1) AS seconds,
    count(engine_start_s) AS engine_starts,
    round(sum(coalesce(engine_start_s, 0)), 1) AS engine_start_s,
    -- rates over the time the engine worked (starts left out); a model stage's from its training
    round(
        coalesce(
            max(tokens_per_s),
            sum(coalesce(tokens_out, tokens_in)) / nullif(sum(seconds) - sum(coalesce(engine_start_s, 0)), 0)
        ),
        1
    ) AS tokens_per_s,
    round(sum(rows_out) / nullif(sum(seconds) - sum(coalesce(engine_start_s, 0)), 0), 2) AS rows_per_s,
    round(max(step_time_s), 2) AS step_time_s,
    round(max(peak_memory_gib), 2) AS peak_memory_gib,
    round(max(mfu), 4) AS mfu,
    string_agg(DISTINCT device, ', ') AS device,
    string_agg(DISTINCT host, ', ') AS host
FROM shard_stats
GROUP BY stage, round
ORDER BY min(finished_at), stage, round;
