-- paygate billing schema. The rules that keep money right live here, not only in the application:
-- at most one live subscription per customer, unique idempotency keys and ledger references, an
-- append-only ledger, foreign keys everywhere, and money as integer micro-units.

CREATE TABLE customers (
    id          uuid PRIMARY KEY,
    external_id text NOT NULL UNIQUE CHECK (length(external_id) BETWEEN 1 AND 128),
    name        text NOT NULL DEFAULT '',
    email       text NOT NULL DEFAULT '',
    currency    text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE plans (
    id                   uuid PRIMARY KEY,
    code                 text NOT NULL UNIQUE CHECK (code ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    name                 text NOT NULL DEFAULT '',
    currency             text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    price_micros         bigint NOT NULL CHECK (price_micros >= 0),
    billing_interval     text NOT NULL CHECK (billing_interval IN ('day', 'week', 'month', 'year')),
    included_units       bigint NOT NULL CHECK (included_units >= 0),
    rate_limit           integer NOT NULL CHECK (rate_limit >= 0),
    rate_period_ms       integer NOT NULL CHECK (rate_period_ms >= 0),
    burst                integer NOT NULL CHECK (burst >= 0),
    overage_mode         text NOT NULL CHECK (overage_mode IN ('block', 'credits')),
    unit_price_micros    bigint NOT NULL CHECK (unit_price_micros >= 0),
    grace_period_seconds integer NOT NULL CHECK (grace_period_seconds >= 0),
    trial_days           integer NOT NULL CHECK (trial_days >= 0),
    features             text[] NOT NULL DEFAULT '{}',
    archived_at          timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    CHECK ((overage_mode = 'credits') = (unit_price_micros > 0)),
    CHECK (rate_limit = 0 OR (rate_period_ms > 0 AND burst > 0))
);

-- A subscription stores facts; its status is computed from them and the clock at read time.
-- Billing periods are anchor + k * interval (calendar arithmetic for months and years).
CREATE TABLE subscriptions (
    id                uuid PRIMARY KEY,
    customer_id       uuid NOT NULL REFERENCES customers (id),
    plan_id           uuid NOT NULL REFERENCES plans (id),
    started_at        timestamptz NOT NULL,
    -- Start of the first paid (or free) period; equals trial_ends_at when there is a trial.
    anchor            timestamptz NOT NULL,
    trial_ends_at     timestamptz,
    -- Payments cover the subscription until this instant.
    paid_through      timestamptz NOT NULL,
    last_payment_at   timestamptz,
    -- Set by a failed renewal payment, cleared by a successful one.
    payment_failed_at timestamptz,
    cancel_at         timestamptz,
    -- Set once the subscription has ended (cancelled or expired); NULL while live.
    ended_at          timestamptz,
    end_reason        text CHECK (end_reason IN ('canceled', 'expired')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((ended_at IS NULL) = (end_reason IS NULL)),
    CHECK (anchor >= started_at),
    CHECK (paid_through >= started_at)
);

-- At most one live subscription per customer.
CREATE UNIQUE INDEX subscriptions_one_live_per_customer ON subscriptions (customer_id) WHERE ended_at IS NULL;
CREATE INDEX subscriptions_by_customer ON subscriptions (customer_id, id);

CREATE TABLE payments (
    id                 uuid PRIMARY KEY,
    idempotency_key    text NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    -- SHA-256 of the canonical request, to tell a retry from a different request with the same key.
    request_digest     bytea NOT NULL CHECK (length(request_digest) = 32),
    customer_id        uuid NOT NULL REFERENCES customers (id),
    subscription_id    uuid REFERENCES subscriptions (id),
    purpose            text NOT NULL CHECK (purpose IN ('subscription', 'credit_top_up')),
    outcome            text NOT NULL CHECK (outcome IN ('succeeded', 'failed')),
    amount_micros      bigint NOT NULL CHECK (amount_micros > 0),
    currency           text NOT NULL,
    provider_reference text NOT NULL DEFAULT '',
    failure_reason     text NOT NULL DEFAULT '',
    ledger_entry_id    bigint,
    paid_through       timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE credit_ledger (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id  uuid NOT NULL REFERENCES customers (id),
    kind         text NOT NULL CHECK (kind IN ('top_up', 'usage', 'refund', 'adjustment')),
    delta_micros bigint NOT NULL,
    reference    text NOT NULL UNIQUE CHECK (length(reference) BETWEEN 1 AND 512),
    note         text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (CASE kind
               WHEN 'top_up' THEN delta_micros > 0
               WHEN 'usage' THEN delta_micros < 0
               WHEN 'refund' THEN delta_micros > 0
               ELSE delta_micros <> 0
           END)
);

CREATE INDEX credit_ledger_by_customer ON credit_ledger (customer_id, id);

ALTER TABLE payments ADD FOREIGN KEY (ledger_entry_id) REFERENCES credit_ledger (id);

CREATE FUNCTION reject_ledger_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit_ledger is append-only: % is not allowed', TG_OP;
END;
$$;

CREATE TRIGGER credit_ledger_append_only
    BEFORE UPDATE OR DELETE ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION reject_ledger_change();

CREATE TRIGGER credit_ledger_no_truncate
    BEFORE TRUNCATE ON credit_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION reject_ledger_change();

CREATE TABLE api_keys (
    id              uuid PRIMARY KEY,
    customer_id     uuid NOT NULL REFERENCES customers (id),
    name            text NOT NULL DEFAULT '',
    prefix          text NOT NULL,
    -- SHA-256 of the whole key; the secret itself is never stored.
    digest          bytea NOT NULL UNIQUE CHECK (length(digest) = 32),
    expires_at      timestamptz,
    revoked_at      timestamptz,
    replaces_key_id uuid REFERENCES api_keys (id),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX api_keys_by_customer ON api_keys (customer_id, id);

-- Spending reported by usage, applied once per report id.
CREATE TABLE usage_reports (
    report_id      text PRIMARY KEY CHECK (length(report_id) BETWEEN 1 AND 128),
    request_digest bytea NOT NULL CHECK (length(request_digest) = 32),
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Each reported entry is applied once by its id, whichever report carries it.
CREATE TABLE usage_entries (
    entry_id   text PRIMARY KEY CHECK (length(entry_id) BETWEEN 1 AND 128),
    report_id  text NOT NULL REFERENCES usage_reports (report_id),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE usage_totals (
    subscription_id uuid NOT NULL REFERENCES subscriptions (id),
    period_start    timestamptz NOT NULL,
    units           bigint NOT NULL,
    credits_micros  bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, period_start)
);

CREATE TABLE audit_events (
    id          uuid PRIMARY KEY,
    actor       text NOT NULL,
    action      text NOT NULL,
    target_type text NOT NULL,
    target_id   text NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX audit_events_by_target ON audit_events (target_id, id);

-- The entitlement change feed. Rows are written in the transaction that makes the change, and a NOTIFY
-- (delivered only at commit) wakes every billing replica. Writers take an advisory lock first so sequence
-- order equals commit order and a reader never skips a row that commits late.
CREATE TABLE change_events (
    sequence     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('key', 'customer', 'credits')),
    customer_id  uuid NOT NULL,
    key_digest   bytea,
    reference    text,
    delta_micros bigint,
    created_at   timestamptz NOT NULL DEFAULT now()
);
