//! The HELP text of every metric the services emit, registered with the recorder when it is installed, so
//! each `# TYPE` line on `/metrics` comes with a `# HELP` line (DESIGN §7). A new metric gets its line here;
//! `docs/observability.md` explains the labels.

use metrics::{describe_counter, describe_gauge, describe_histogram};

/// Registers the description of every paygate metric with the global recorder.
pub fn describe_all() {
    describe_gateway();
    describe_usage();
    describe_billing();
}

fn describe_gateway() {
    describe_counter!(
        "paygate_gateway_requests_total",
        "Requests answered by the gateway, by route, decision code and HTTP status"
    );
    describe_histogram!(
        "paygate_gateway_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from a request's arrival until its answer's head is ready, by route"
    );
    describe_histogram!(
        "paygate_gateway_decision_duration_seconds",
        metrics::Unit::Seconds,
        "Time the gateway took to decide: until forwarding starts or a refusal is ready"
    );
    describe_histogram!(
        "paygate_gateway_upstream_duration_seconds",
        metrics::Unit::Seconds,
        "Time spent waiting for the upstream's answer, by route"
    );
    describe_counter!(
        "paygate_gateway_entitlement_cache_total",
        "Entitlement cache look-ups, by result (hit or miss)"
    );
    describe_counter!(
        "paygate_gateway_entitlement_stale_serves_total",
        "Requests decided on a cached entitlement because billing could not be asked"
    );
    describe_counter!(
        "paygate_gateway_backend_errors_total",
        "Requests whose call to billing or usage gave no answer, by backend and kind"
    );
    describe_gauge!(
        "paygate_gateway_breaker_open",
        "1 while the backend's circuit breaker is open, else 0"
    );
    describe_counter!(
        "paygate_gateway_degraded_passes_total",
        "Requests forwarded unmetered on a failure_mode = open route during an outage"
    );
    describe_counter!(
        "paygate_gateway_admissions_total",
        "Requests admitted, by where: from a lease held in memory (lease) or by a call to usage (usage)"
    );
    describe_counter!(
        "paygate_gateway_lease_events_total",
        "Lease events at this gateway: granted, empty (usage granted nothing), failed, returned, recalled, written_off"
    );
    describe_gauge!(
        "paygate_gateway_leases_held",
        "Customers this gateway holds a lease for now"
    );
    describe_gauge!(
        "paygate_gateway_connections_open",
        "Client connections open now"
    );
    describe_counter!(
        "paygate_gateway_connections_closed_total",
        "Client connections the gateway closed itself, by reason"
    );
    describe_counter!(
        "paygate_gateway_route_reloads_total",
        "Reloads of the routes file, by result (applied or refused)"
    );
}

fn describe_usage() {
    describe_counter!(
        "paygate_usage_admissions_total",
        "Admission decisions made by usage, by outcome"
    );
    describe_histogram!(
        "paygate_usage_script_duration_seconds",
        metrics::Unit::Seconds,
        "Duration of one call of the admission script in Redis"
    );
    describe_gauge!(
        "paygate_usage_report_lag_seconds",
        metrics::Unit::Seconds,
        "Seconds since spending was last reported to billing successfully"
    );
    describe_gauge!(
        "paygate_usage_outbox_customers",
        "Customers with spending not yet reported to billing"
    );
    describe_counter!(
        "paygate_usage_mirror_repairs_total",
        "Credit mirrors set back to billing's ledger less unreported spending, by direction"
    );
    describe_counter!(
        "paygate_usage_leases_granted_total",
        "Leases granted to gateways (grants that reserved units; empty grants not counted)"
    );
    describe_counter!(
        "paygate_usage_leases_returned_total",
        "Leases returned by their holders (unspent units given back, spent units billed)"
    );
    describe_counter!(
        "paygate_usage_leases_recalled_total",
        "Leases recalled because an admission needed the units or slots they held"
    );
    describe_counter!(
        "paygate_usage_leases_written_off_total",
        "Leases not returned by their deadline plus grace: units never admitted again, never billed"
    );
}

fn describe_billing() {
    describe_counter!(
        "paygate_billing_rpcs_total",
        "gRPC calls served by billing, by method and status code"
    );
    describe_counter!(
        "paygate_billing_ledger_writes_total",
        "Credit ledger rows written, by kind"
    );
    describe_gauge!(
        "paygate_billing_change_stream_subscribers",
        "Open WatchChanges streams"
    );
}
