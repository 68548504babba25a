-- The last outbox of each customer's spending that usage reported and billing applied (UsageEntry.
-- outbox_sequence). usage numbers its sealed outboxes per customer; an outbox numbered at or below this one
-- was sealed again by a Redis that lost writes, so its spending may already be charged and is skipped.
CREATE TABLE usage_outbox_sequences (
    customer_id     uuid PRIMARY KEY REFERENCES customers (id),
    outbox_sequence bigint NOT NULL CHECK (outbox_sequence > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
