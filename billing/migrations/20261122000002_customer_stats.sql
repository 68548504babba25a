-- Runtime statistics per customer and UTC hour, summed over every gateway's reports (ReportStats). Counts
-- are exact: each report is applied once by its id (stats_reports, in the same transaction).
CREATE TABLE customer_hourly_stats (
    customer_id              uuid        NOT NULL REFERENCES customers (id),
    hour                     timestamptz NOT NULL CHECK (extract(epoch FROM hour)::bigint % 3600 = 0),
    admitted                 bigint      NOT NULL CHECK (admitted >= 0),
    upstream_2xx             bigint      NOT NULL CHECK (upstream_2xx >= 0),
    upstream_4xx             bigint      NOT NULL CHECK (upstream_4xx >= 0),
    upstream_5xx             bigint      NOT NULL CHECK (upstream_5xx >= 0),
    upstream_other           bigint      NOT NULL CHECK (upstream_other >= 0),
    -- Answers the gateway made itself, per problem code, in the order of `billing::domain::ANSWER_CODES`
    -- (new codes are appended there, so stored positions keep their meaning).
    answered                 bigint[]    NOT NULL,
    units                    bigint      NOT NULL,
    credits_micros           bigint      NOT NULL,
    upstream_latency_sum_us  bigint      NOT NULL CHECK (upstream_latency_sum_us >= 0),
    -- Counts per bucket of `billing::domain::UPSTREAM_LATENCY_BUCKETS_MS`, then +Inf.
    upstream_latency_buckets bigint[]    NOT NULL,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, hour)
);

CREATE TABLE stats_reports (
    report_id  text        PRIMARY KEY CHECK (length(report_id) BETWEEN 1 AND 128),
    created_at timestamptz NOT NULL DEFAULT now()
);
