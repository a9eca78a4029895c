-- Hint leakage: which posterior traces already state a gold answer in the first 25% of their think span (q_phi copying the hint y' instead of reasoning towards it)?
WITH traces AS (
    SELECT
        s.prompt_idx,
        s.sample_idx,
        p.source,
        s.think,
        list_filter(p.gold, lambda g: length(trim(g)) > 0) AS gold,
        left(s.think, CAST(ceil(length(s.think) * 0.25) AS BIGINT)) AS head
    FROM posterior_samples AS s
    JOIN problems AS p USING (prompt_idx)
    WHERE len(p.gold) > 0 AND length(coalesce(s.think, '')) > 0
),
hits AS (
    SELECT
        *,
        -- a whole token, so gold "3" does not match inside "13" or "3.5"
        list_filter(
            gold,
            lambda g: regexp_matches(head, '(^|[^0-9A-Za-z.])' || regexp_escape(trim(g)) || '($|[^0-9A-Za-z])')
        ) AS leaked
    FROM traces
)
SELECT
    prompt_idx,
    sample_idx,
    source,
    leaked,
    round(strpos(think, trim(leaked[1])) / length(think), 3) AS first_hit_frac,
    length(think) AS think_chars,
    count(*) OVER () AS leaked_traces,
    (SELECT count(*) FROM traces) AS traces_with_gold,
    left(head, 200) AS head_preview
FROM hits
WHERE len(leaked) > 0
ORDER BY first_hit_frac, prompt_idx, sample_idx;
