//! Renders billing's answers: aligned tables for people, JSON for scripts (enum names and RFC 3339
//! instants, money both as micros and as a decimal amount), or just the id.

use std::io::{self, Write};

use prost_types::Timestamp;
use serde_json::{Value, json};

use proto::billing::v1 as pb;

/// How to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Quiet,
}

/// An answer to print.
pub enum Render {
    /// Customers and the next page's token (empty on the last page).
    Customers(Vec<pb::Customer>, String),
    Plans(Vec<pb::Plan>),
    Subscription(pb::Subscription),
    Payment(pb::Payment),
    Ledger(Vec<pb::LedgerEntry>, String),
    Balance(pb::CreditBalance),
    IssuedKey(pb::IssuedApiKey),
    Keys(Vec<pb::ApiKey>),
    Usage(Vec<pb::PeriodUsage>),
    Stats(Vec<pb::HourStats>),
    Audit(Vec<pb::AuditEvent>, String),
}

fn instant(timestamp: &Option<Timestamp>) -> String {
    timestamp
        .as_ref()
        .and_then(|value| time::OffsetDateTime::from_unix_timestamp(value.seconds).ok())
        .and_then(|value| {
            value
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn json_instant(timestamp: &Option<Timestamp>) -> Value {
    match instant(timestamp) {
        text if text.is_empty() => Value::Null,
        text => Value::String(text),
    }
}

/// Formats micros as a decimal amount with two to six places (`29.00`, `0.001`).
pub fn amount(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let magnitude = micros.unsigned_abs();
    let fraction = format!("{:06}", magnitude % 1_000_000);
    let fraction = fraction.trim_end_matches('0');
    format!("{sign}{}.{fraction:0<2}", magnitude / 1_000_000)
}

fn enum_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

fn status_name(status: i32) -> String {
    let name = pb::SubscriptionStatus::try_from(status)
        .map(|value| value.as_str_name())
        .unwrap_or("UNKNOWN");
    enum_name(name, "SUBSCRIPTION_STATUS_")
}

fn customer_json(customer: &pb::Customer) -> Value {
    json!({
        "id": customer.id, "external_id": customer.external_id, "name": customer.name, "email": customer.email,
        "currency": customer.currency, "created_at": json_instant(&customer.created_at),
    })
}

fn plan_json(plan: &pb::Plan) -> Value {
    let interval = pb::BillingInterval::try_from(plan.interval)
        .map(|value| value.as_str_name())
        .unwrap_or("UNKNOWN");
    let overage = pb::OverageMode::try_from(plan.overage_mode)
        .map(|value| value.as_str_name())
        .unwrap_or("UNKNOWN");
    json!({
        "id": plan.id, "code": plan.code, "name": plan.name, "currency": plan.currency,
        "price_micros": plan.price_micros, "price": amount(plan.price_micros),
        "interval": enum_name(interval, "BILLING_INTERVAL_"), "included_units": plan.included_units,
        "rate_limit": plan.rate_limit, "rate_period_ms": plan.rate_period_ms, "burst": plan.burst,
        "overage": enum_name(overage, "OVERAGE_MODE_"), "unit_price_micros": plan.unit_price_micros,
        "grace_period_seconds": plan.grace_period_seconds, "trial_days": plan.trial_days, "features": plan.features,
        "archived_at": json_instant(&plan.archived_at), "created_at": json_instant(&plan.created_at),
    })
}

fn subscription_json(subscription: &pb::Subscription) -> Value {
    json!({
        "id": subscription.id, "customer_id": subscription.customer_id, "plan_id": subscription.plan_id,
        "plan_code": subscription.plan_code, "status": status_name(subscription.status),
        "current_period_start": json_instant(&subscription.current_period_start),
        "current_period_end": json_instant(&subscription.current_period_end),
        "paid_through": json_instant(&subscription.paid_through),
        "trial_ends_at": json_instant(&subscription.trial_ends_at),
        "past_due_since": json_instant(&subscription.past_due_since),
        "grace_ends_at": json_instant(&subscription.grace_ends_at),
        "cancel_at_period_end": subscription.cancel_at_period_end,
        "cancel_at": json_instant(&subscription.cancel_at),
        "ended_at": json_instant(&subscription.ended_at),
        "created_at": json_instant(&subscription.created_at),
    })
}

fn payment_json(payment: &pb::Payment) -> Value {
    let purpose = pb::PaymentPurpose::try_from(payment.purpose)
        .map(|value| value.as_str_name())
        .unwrap_or("UNKNOWN");
    let outcome = pb::PaymentOutcome::try_from(payment.outcome)
        .map(|value| value.as_str_name())
        .unwrap_or("UNKNOWN");
    json!({
        "id": payment.id, "idempotency_key": payment.idempotency_key, "customer_id": payment.customer_id,
        "subscription_id": payment.subscription_id, "purpose": enum_name(purpose, "PAYMENT_PURPOSE_"),
        "outcome": enum_name(outcome, "PAYMENT_OUTCOME_"), "amount_micros": payment.amount_micros,
        "amount": amount(payment.amount_micros), "currency": payment.currency,
        "provider_reference": payment.provider_reference, "failure_reason": payment.failure_reason,
        "ledger_entry_id": payment.ledger_entry_id, "paid_through": json_instant(&payment.paid_through),
        "created_at": json_instant(&payment.created_at),
    })
}

fn ledger_json(entry: &pb::LedgerEntry) -> Value {
    let kind = pb::LedgerEntryKind::try_from(entry.kind)
        .map(|value| value.as_str_name())
        .unwrap_or("UNKNOWN");
    json!({
        "id": entry.id, "customer_id": entry.customer_id, "kind": enum_name(kind, "LEDGER_ENTRY_KIND_"),
        "delta_micros": entry.delta_micros, "delta": amount(entry.delta_micros), "reference": entry.reference,
        "note": entry.note, "created_at": json_instant(&entry.created_at),
    })
}

fn key_json(key: &pb::ApiKey) -> Value {
    json!({
        "id": key.id, "customer_id": key.customer_id, "name": key.name, "prefix": key.prefix,
        "created_at": json_instant(&key.created_at), "expires_at": json_instant(&key.expires_at),
        "revoked_at": json_instant(&key.revoked_at), "replaces_key_id": key.replaces_key_id,
    })
}

/// Writes rows as columns padded to their widest cell.
fn table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|name| name.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(
        out,
        "{}",
        line(header.iter().map(|name| name.to_string()).collect())
    )?;
    for row in rows {
        writeln!(out, "{}", line(row.clone()))?;
    }
    Ok(())
}

fn next_page(out: &mut impl Write, token: &str) -> io::Result<()> {
    if token.is_empty() {
        Ok(())
    } else {
        writeln!(out, "more: --page-token {token}")
    }
}

impl Render {
    /// Writes the answer in `format`.
    pub fn write(&self, format: Format, out: &mut impl Write) -> io::Result<()> {
        match format {
            Format::Json => {
                serde_json::to_writer_pretty(&mut *out, &self.json())?;
                writeln!(out)
            }
            Format::Quiet => {
                for id in self.ids() {
                    writeln!(out, "{id}")?;
                }
                Ok(())
            }
            Format::Table => self.table(out),
        }
    }

    fn ids(&self) -> Vec<String> {
        match self {
            Self::Customers(customers, _) => customers
                .iter()
                .map(|customer| customer.id.clone())
                .collect(),
            Self::Plans(plans) => plans.iter().map(|plan| plan.id.clone()).collect(),
            Self::Subscription(subscription) => vec![subscription.id.clone()],
            Self::Payment(payment) => vec![payment.id.clone()],
            Self::Ledger(entries, _) => entries.iter().map(|entry| entry.id.to_string()).collect(),
            Self::Balance(balance) => vec![amount(balance.balance_micros)],
            // The secret is what a script needs from an issued key.
            Self::IssuedKey(issued) => vec![issued.secret.clone()],
            Self::Keys(keys) => keys.iter().map(|key| key.id.clone()).collect(),
            Self::Usage(periods) => periods
                .iter()
                .map(|period| period.units.to_string())
                .collect(),
            Self::Stats(hours) => hours.iter().map(|hour| hour.admitted.to_string()).collect(),
            Self::Audit(events, _) => events.iter().map(|event| event.id.clone()).collect(),
        }
    }

    fn json(&self) -> Value {
        match self {
            Self::Customers(customers, token) => {
                json!({ "customers": customers.iter().map(customer_json).collect::<Vec<_>>(), "next_page_token": token })
            }
            Self::Plans(plans) if plans.len() == 1 => plan_json(&plans[0]),
            Self::Plans(plans) => {
                json!({ "plans": plans.iter().map(plan_json).collect::<Vec<_>>() })
            }
            Self::Subscription(subscription) => subscription_json(subscription),
            Self::Payment(payment) => payment_json(payment),
            Self::Ledger(entries, token) if entries.len() == 1 && token.is_empty() => {
                ledger_json(&entries[0])
            }
            Self::Ledger(entries, token) => {
                json!({ "entries": entries.iter().map(ledger_json).collect::<Vec<_>>(), "next_page_token": token })
            }
            Self::Balance(balance) => json!({
                "customer_id": balance.customer_id, "balance_micros": balance.balance_micros,
                "balance": amount(balance.balance_micros), "currency": balance.currency,
            }),
            Self::IssuedKey(issued) => {
                let mut key = issued.key.as_ref().map(key_json).unwrap_or(Value::Null);
                if let Value::Object(fields) = &mut key {
                    fields.insert("secret".into(), Value::String(issued.secret.clone()));
                }
                key
            }
            Self::Keys(keys) if keys.len() == 1 => key_json(&keys[0]),
            Self::Keys(keys) => json!({ "keys": keys.iter().map(key_json).collect::<Vec<_>>() }),
            Self::Usage(periods) => json!({ "periods": periods.iter().map(|period| json!({
                "subscription_id": period.subscription_id, "period_start": json_instant(&period.period_start),
                "units": period.units, "credits_micros": period.credits_micros, "credits": amount(period.credits_micros),
            })).collect::<Vec<_>>() }),
            Self::Stats(hours) => json!({ "hours": hours.iter().map(|hour| json!({
                "hour": json_instant(&hour.hour), "admitted": hour.admitted,
                "upstream_2xx": hour.upstream_2xx, "upstream_4xx": hour.upstream_4xx,
                "upstream_5xx": hour.upstream_5xx, "upstream_other": hour.upstream_other,
                "answered": hour.answered.iter().collect::<std::collections::BTreeMap<_, _>>(),
                "units": hour.units, "credits_micros": hour.credits_micros, "credits": amount(hour.credits_micros),
                "upstream_latency_mean_ms": hour.upstream_latency_mean_ms,
                "upstream_latency_p95_ms": hour.upstream_latency_p95_ms,
            })).collect::<Vec<_>>() }),
            Self::Audit(events, token) => json!({ "events": events.iter().map(|event| json!({
                "id": event.id, "actor": event.actor, "action": event.action, "target_type": event.target_type,
                "target_id": event.target_id,
                "details": serde_json::from_str::<Value>(&event.details_json).unwrap_or(Value::Null),
                "created_at": json_instant(&event.created_at),
            })).collect::<Vec<_>>(), "next_page_token": token }),
        }
    }

    fn table(&self, out: &mut impl Write) -> io::Result<()> {
        match self {
            Self::Customers(customers, token) => {
                let rows: Vec<Vec<String>> = customers
                    .iter()
                    .map(|customer| {
                        vec![
                            customer.id.clone(),
                            customer.external_id.clone(),
                            customer.name.clone(),
                            customer.currency.clone(),
                            instant(&customer.created_at),
                        ]
                    })
                    .collect();
                table(
                    out,
                    &["ID", "EXTERNAL ID", "NAME", "CURRENCY", "CREATED"],
                    &rows,
                )?;
                next_page(out, token)
            }
            Self::Plans(plans) => {
                let rows: Vec<Vec<String>> = plans
                    .iter()
                    .map(|plan| {
                        let value = plan_json(plan);
                        vec![
                            plan.id.clone(),
                            plan.code.clone(),
                            format!("{} {}", amount(plan.price_micros), plan.currency),
                            value["interval"].as_str().unwrap_or_default().to_owned(),
                            plan.included_units.to_string(),
                            if plan.rate_limit == 0 {
                                "-".into()
                            } else {
                                format!(
                                    "{}/{}ms burst {}",
                                    plan.rate_limit, plan.rate_period_ms, plan.burst
                                )
                            },
                            value["overage"].as_str().unwrap_or_default().to_owned(),
                            if plan.archived_at.is_some() {
                                "archived".into()
                            } else {
                                String::new()
                            },
                        ]
                    })
                    .collect();
                table(
                    out,
                    &[
                        "ID", "CODE", "PRICE", "INTERVAL", "INCLUDED", "RATE", "OVERAGE", "",
                    ],
                    &rows,
                )
            }
            Self::Subscription(subscription) => {
                let value = subscription_json(subscription);
                let fields = [
                    ("id", subscription.id.clone()),
                    ("customer", subscription.customer_id.clone()),
                    (
                        "plan",
                        format!("{} ({})", subscription.plan_code, subscription.plan_id),
                    ),
                    ("status", status_name(subscription.status)),
                    (
                        "period",
                        format!(
                            "{} → {}",
                            instant(&subscription.current_period_start),
                            instant(&subscription.current_period_end)
                        ),
                    ),
                    ("paid through", instant(&subscription.paid_through)),
                    ("grace ends", instant(&subscription.grace_ends_at)),
                    ("cancel at", instant(&subscription.cancel_at)),
                    (
                        "ended",
                        value["ended_at"].as_str().unwrap_or_default().to_owned(),
                    ),
                ];
                for (name, text) in fields.iter().filter(|(_, text)| !text.is_empty()) {
                    writeln!(out, "{name:<13} {text}")?;
                }
                Ok(())
            }
            Self::Payment(payment) => {
                let value = payment_json(payment);
                let row = vec![
                    payment.id.clone(),
                    value["purpose"].as_str().unwrap_or_default().to_owned(),
                    value["outcome"].as_str().unwrap_or_default().to_owned(),
                    format!("{} {}", amount(payment.amount_micros), payment.currency),
                    instant(&payment.paid_through),
                ];
                table(
                    out,
                    &["ID", "PURPOSE", "OUTCOME", "AMOUNT", "PAID THROUGH"],
                    &[row],
                )
            }
            Self::Ledger(entries, token) => {
                let rows: Vec<Vec<String>> = entries
                    .iter()
                    .map(|entry| {
                        let value = ledger_json(entry);
                        vec![
                            entry.id.to_string(),
                            value["kind"].as_str().unwrap_or_default().to_owned(),
                            amount(entry.delta_micros),
                            entry.reference.clone(),
                            entry.note.clone(),
                            instant(&entry.created_at),
                        ]
                    })
                    .collect();
                table(
                    out,
                    &["ID", "KIND", "AMOUNT", "REFERENCE", "NOTE", "CREATED"],
                    &rows,
                )?;
                next_page(out, token)
            }
            Self::Balance(balance) => writeln!(
                out,
                "{} {}",
                amount(balance.balance_micros),
                balance.currency
            ),
            Self::IssuedKey(issued) => {
                if let Some(key) = &issued.key {
                    writeln!(out, "id      {}", key.id)?;
                }
                writeln!(out, "secret  {}", issued.secret)?;
                writeln!(out, "(shown this once: billing keeps only its digest)")
            }
            Self::Keys(keys) => {
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|key| {
                        let state = if key.revoked_at.is_some() {
                            format!("revoked {}", instant(&key.revoked_at))
                        } else if key.expires_at.is_some() {
                            format!("expires {}", instant(&key.expires_at))
                        } else {
                            "active".into()
                        };
                        vec![
                            key.id.clone(),
                            key.prefix.clone(),
                            key.name.clone(),
                            state,
                            instant(&key.created_at),
                        ]
                    })
                    .collect();
                table(out, &["ID", "PREFIX", "NAME", "STATE", "CREATED"], &rows)
            }
            Self::Usage(periods) => {
                let rows: Vec<Vec<String>> = periods
                    .iter()
                    .map(|period| {
                        vec![
                            instant(&period.period_start),
                            period.subscription_id.clone(),
                            period.units.to_string(),
                            amount(period.credits_micros),
                        ]
                    })
                    .collect();
                table(
                    out,
                    &["PERIOD START", "SUBSCRIPTION", "UNITS", "CREDITS"],
                    &rows,
                )
            }
            Self::Stats(hours) => {
                let rows: Vec<Vec<String>> = hours
                    .iter()
                    .map(|hour| {
                        let answered: std::collections::BTreeMap<_, _> =
                            hour.answered.iter().collect();
                        vec![
                            instant(&hour.hour),
                            hour.admitted.to_string(),
                            format!(
                                "{}/{}/{}",
                                hour.upstream_2xx, hour.upstream_4xx, hour.upstream_5xx
                            ),
                            answered
                                .iter()
                                .map(|(code, count)| format!("{code}={count}"))
                                .collect::<Vec<_>>()
                                .join(" "),
                            hour.units.to_string(),
                            amount(hour.credits_micros),
                            format!("{:.1}", hour.upstream_latency_mean_ms),
                            format!("{:.1}", hour.upstream_latency_p95_ms),
                        ]
                    })
                    .collect();
                table(
                    out,
                    &[
                        "HOUR",
                        "ADMITTED",
                        "2XX/4XX/5XX",
                        "ANSWERED",
                        "UNITS",
                        "CREDITS",
                        "MEAN MS",
                        "P95 MS",
                    ],
                    &rows,
                )
            }
            Self::Audit(events, token) => {
                let rows: Vec<Vec<String>> = events
                    .iter()
                    .map(|event| {
                        vec![
                            instant(&event.created_at),
                            event.actor.clone(),
                            event.action.clone(),
                            format!("{} {}", event.target_type, event.target_id),
                        ]
                    })
                    .collect();
                table(out, &["WHEN", "ACTOR", "ACTION", "TARGET"], &rows)?;
                next_page(out, token)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_keep_two_to_six_places() {
        assert_eq!(amount(29_000_000), "29.00");
        assert_eq!(amount(1_000), "0.001");
        assert_eq!(amount(-2_500_000), "-2.50");
        assert_eq!(amount(0), "0.00");
    }

    #[test]
    fn tables_align_columns() {
        let mut out = Vec::new();

        table(
            &mut out,
            &["A", "B"],
            &[
                vec!["long value".into(), "x".into()],
                vec!["y".into(), "z".into()],
            ],
        )
        .expect("write");

        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "A           B\nlong value  x\ny           z\n"
        );
    }
}
