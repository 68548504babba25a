//! Speaks the operator's language in both directions: the plan codes and customer external ids they type
//! become ids, and billing's refusals, which name proto fields and micros, come back naming flags and amounts.

use tonic::{Code, Status};

use proto::billing::v1 as pb;

use crate::{Admin, CtlError, output::amount};

/// Why a command failed: billing refused a call, or paygatectl itself can say what is wrong.
pub(crate) enum Failure {
    Billing(Status),
    Ctl(CtlError),
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Self::Billing(status)
    }
}

impl From<CtlError> for Failure {
    fn from(error: CtlError) -> Self {
        Self::Ctl(error)
    }
}

/// Billing's field names and the flag (or argument) of paygatectl each one comes from.
const FLAGS: &[(&str, &str)] = &[
    ("amount_micros", "--amount"),
    ("delta_micros", "--amount"),
    ("price_micros", "--price"),
    ("unit_price_micros", "--unit-price"),
    ("customer_id", "--customer"),
    ("plan_id", "--plan"),
    ("subscription_id", "<ID>"),
    ("key_id", "<ID>"),
    ("external_id", "--external-id"),
    ("name", "--name"),
    ("email", "--email"),
    ("currency", "--currency"),
    ("code", "--code"),
    ("interval", "--interval"),
    ("included_units", "--included-units"),
    ("rate_period_ms", "--rate-period-ms"),
    ("overage_mode", "--overage"),
    ("grace_period_seconds", "--grace-seconds"),
    ("grace_seconds", "--grace-seconds"),
    ("trial_days", "--trial-days"),
    ("idempotency_key", "--idempotency-key"),
    ("purpose", "--purpose"),
    ("provider_reference", "--provider-reference"),
    ("failure_reason", "--reason"),
    ("reference", "--reference"),
    ("note", "--note"),
    ("page_size", "--page-size"),
    ("page_token", "--page-token"),
    ("target_id", "--target"),
    ("from", "--hours"),
    ("to", "--hours"),
    ("paygate-actor", "--actor"),
];

/// Words in billing's messages after which an amount in micros follows.
const MONEY_MARKERS: &[&str] = &["got ", "balance ", "adjustment "];

/// Rewrites a message of billing for a person at paygatectl: the `` `field` `` it starts with becomes its
/// flag, and micros after a money field (or in a message about the balance) become amounts (`-5.00 USD`).
/// Only the leading field is rewritten: later backticks quote values the operator typed.
pub(crate) fn in_flags(message: &str, currency: Option<&str>) -> String {
    let leading = message.strip_prefix('`').and_then(|rest| {
        let (field, rest) = rest.split_once('`')?;
        let (name, flag) = FLAGS.iter().find(|(name, _)| *name == field)?;
        Some((format!("{flag}{rest}"), name.ends_with("_micros")))
    });
    match leading {
        Some((words, true)) => amounts_in_currency(&words, currency),
        Some((words, false)) => words,
        None if message.contains("balance") => amounts_in_currency(message, currency),
        None => message.to_owned(),
    }
}

/// Replaces each number of micros after a money marker by an amount, with `currency` when known.
fn amounts_in_currency(message: &str, currency: Option<&str>) -> String {
    let mut shown = String::with_capacity(message.len() + 16);
    let mut rest = message;
    while let Some(start) = MONEY_MARKERS
        .iter()
        .filter_map(|marker| rest.find(marker).map(|at| at + marker.len()))
        .min()
    {
        shown.push_str(&rest[..start]);
        rest = &rest[start..];
        let digits = rest
            .char_indices()
            .take_while(|(index, char)| char.is_ascii_digit() || (*index == 0 && *char == '-'))
            .count();
        match rest[..digits].parse::<i64>() {
            Ok(micros) => {
                shown.push_str(&amount(micros));
                if let Some(currency) = currency {
                    shown.push(' ');
                    shown.push_str(currency);
                }
            }
            Err(_) => shown.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    shown.push_str(rest);
    shown
}

/// Tells whether `text` has the shape of a UUID (the ids billing hands out), as opposed to a code or name.
fn looks_like_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(index, char)| match index {
            8 | 13 | 18 | 23 => char == '-',
            _ => char.is_ascii_hexdigit(),
        })
}

/// Returns the customer `value` names, given as `flag`: the customer with that id, or else the one with
/// that external id (an external id may itself look like a UUID, so a miss by id falls back to it).
pub(crate) async fn customer(
    admin: &mut Admin,
    flag: &'static str,
    value: &str,
) -> Result<pb::Customer, Failure> {
    let no_match = || CtlError::NoMatch {
        flag,
        kind: "customer",
        what: "id or external id",
        value: value.to_owned(),
    };
    if value.is_empty() {
        return Err(no_match().into());
    }
    let mut lookups = Vec::with_capacity(2);
    if looks_like_uuid(value) {
        lookups.push(pb::GetCustomerRequest {
            customer_id: value.to_owned(),
            external_id: String::new(),
        });
    }
    lookups.push(pb::GetCustomerRequest {
        customer_id: String::new(),
        external_id: value.to_owned(),
    });
    for lookup in lookups {
        match admin.client.get_customer(admin.request(lookup)).await {
            Ok(found) => {
                let found = found.into_inner();
                admin.currency = Some(found.currency.clone());
                return Ok(found);
            }
            Err(status) if status.code() == Code::NotFound => continue,
            Err(status) => return Err(status.into()),
        }
    }
    Err(no_match().into())
}

/// Returns the id of the customer `value` names, as [`customer`] finds it.
pub(crate) async fn customer_id(
    admin: &mut Admin,
    flag: &'static str,
    value: &str,
) -> Result<String, Failure> {
    Ok(customer(admin, flag, value).await?.id)
}

/// Returns the id of the plan `value` names, given as `flag`: by id or by code, archived plans included
/// (billing then says why an archived plan cannot be used).
pub(crate) async fn plan_id(
    admin: &mut Admin,
    flag: &'static str,
    value: &str,
) -> Result<String, Failure> {
    let plans = admin
        .client
        .list_plans(admin.request(pb::ListPlansRequest {
            include_archived: true,
        }))
        .await?
        .into_inner()
        .plans;
    // An id wins over a code, though codes are lower-case and could in principle be shaped like an id.
    let found = plans
        .iter()
        .find(|plan| plan.id == value)
        .or_else(|| plans.iter().find(|plan| plan.code == value));
    match found {
        Some(plan) => {
            admin.currency.get_or_insert_with(|| plan.currency.clone());
            Ok(plan.id.clone())
        }
        None => Err(CtlError::NoMatch {
            flag,
            kind: "plan",
            what: "id or code",
            value: value.to_owned(),
        }
        .into()),
    }
}

/// Returns the id the audit log is filtered by: `value` itself when it is empty or an id, else the id of
/// the customer with that external id or of the plan with that code.
pub(crate) async fn audit_target(admin: &mut Admin, value: &str) -> Result<String, Failure> {
    if value.is_empty() || looks_like_uuid(value) {
        return Ok(value.to_owned());
    }
    let lookup = pb::GetCustomerRequest {
        customer_id: String::new(),
        external_id: value.to_owned(),
    };
    match admin.client.get_customer(admin.request(lookup)).await {
        Ok(found) => return Ok(found.into_inner().id),
        Err(status) if status.code() == Code::NotFound => {}
        Err(status) => return Err(status.into()),
    }
    match plan_id(admin, "--target", value).await {
        Err(Failure::Ctl(CtlError::NoMatch { .. })) => Err(CtlError::NoMatch {
            flag: "--target",
            kind: "customer or plan",
            what: "id, external id or code",
            value: value.to_owned(),
        }
        .into()),
        found => found,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_field_names_become_flags_and_micros_become_amounts() {
        assert_eq!(
            in_flags(
                "`amount_micros` must be positive, got -5000000",
                Some("USD")
            ),
            "--amount must be positive, got -5.00 USD"
        );
        assert_eq!(
            in_flags("`price_micros` must not be negative, got -1", None),
            "--price must not be negative, got -0.000001"
        );
        assert_eq!(
            in_flags("`code` must be 1 to 64 of a-z, 0-9, `_`, `-`", None),
            "--code must be 1 to 64 of a-z, 0-9, `_`, `-`"
        );
        assert_eq!(
            in_flags("`subscription_id` must be a UUID", None),
            "<ID> must be a UUID"
        );
        assert_eq!(in_flags("customer not found", None), "customer not found");
        assert_eq!(
            in_flags(
                "the adjustment would take the balance below zero (balance 0, adjustment -5000000)",
                Some("EUR")
            ),
            "the adjustment would take the balance below zero (balance 0.00 EUR, adjustment -5.00 EUR)"
        );
        assert_eq!(
            in_flags("reference `note` was used for a different request", None),
            "reference `note` was used for a different request"
        );
    }

    #[test]
    fn only_the_shape_of_a_uuid_is_taken_for_an_id() {
        assert!(looks_like_uuid("0190f1f2-3c4d-7e5f-8a9b-0c1d2e3f4a5b"));
        assert!(!looks_like_uuid("acme"));
        assert!(!looks_like_uuid("0190f1f2-3c4d-7e5f-8a9b-0c1d2e3f4a5"));
        assert!(!looks_like_uuid("0190f1f2x3c4d-7e5f-8a9b-0c1d2e3f4a5b"));
    }
}
