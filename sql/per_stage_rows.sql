-- Rows per stage and round: the manifest's row count beside the rows actually in its Parquet shards, in DAG order.
SELECT
    stage,
    table_name,
    round,
    status,
    rows AS manifest_rows,
    parquet_rows,
    shards,
    wall_time_s,
    fingerprint
FROM run_stages
ORDER BY
    coalesce(
        list_position(
            ['problems', 'posterior_samples', 'logps', 'rollouts', 'verdicts', 'weights', 'train', 'eval'],
            coalesce(table_name, stage)
        ),
        100
    ),
    stage,
    round;
