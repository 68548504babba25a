//! docker-compose.yml checked against the services' real configuration: every variable it sets is one the
//! service reads, the required ones are there, the addresses agree, and every secret it needs is in
//! .env.example. (No Docker engine runs here; this is what can be checked without one.)

use std::collections::{BTreeMap, BTreeSet};

use clap::CommandFactory;

/// Service name → its `environment:` entries, read from the compose file's plain YAML layout.
fn compose_environments(compose: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut services = BTreeMap::new();
    let mut in_services = false;
    let mut service: Option<String> = None;
    let mut in_environment = false;
    for line in compose.lines() {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        match indent {
            0 => {
                in_services = text == "services:";
                service = None;
            }
            2 if in_services => {
                service = text.strip_suffix(':').map(str::to_owned);
                in_environment = false;
            }
            4 => in_environment = text == "environment:",
            6 if in_environment => {
                let (key, value) = text.split_once(':').expect("KEY: value");
                let name = service.clone().expect("inside a service");
                services
                    .entry(name)
                    .or_insert_with(BTreeMap::new)
                    .insert(key.trim().to_owned(), value.trim().to_owned());
            }
            _ => {}
        }
    }
    services
}

fn env_names(command: clap::Command) -> BTreeSet<String> {
    command
        .get_arguments()
        .filter_map(|argument| argument.get_env())
        .map(|name| name.to_string_lossy().into_owned())
        .chain([
            "RUST_LOG".to_owned(),
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
        ])
        .collect()
}

fn port(address: &str) -> &str {
    address.rsplit(':').next().expect("an address with a port")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path),
    )
    .unwrap_or_else(|error| panic!("{path}: {error}"))
}

#[test]
fn compose_sets_only_settings_the_services_read_and_every_one_they_require() {
    let environments = compose_environments(&read("docker-compose.yml"));
    let known = [
        ("billing", env_names(billing::Config::command())),
        ("usage", env_names(usage::Config::command())),
        ("gateway", env_names(gateway::Config::command())),
    ];
    let required = [
        (
            "billing",
            vec![
                "DATABASE_URL",
                "BILLING_ADMIN_TOKEN",
                "PAYGATE_SERVICE_TOKEN",
                "BILLING_LISTEN_ADDR",
            ],
        ),
        (
            "usage",
            vec![
                "REDIS_URL",
                "PAYGATE_SERVICE_TOKEN",
                "BILLING_URL",
                "USAGE_LISTEN_ADDR",
            ],
        ),
        (
            "gateway",
            vec![
                "GATEWAY_CONFIG",
                "PAYGATE_SERVICE_TOKEN",
                "BILLING_URL",
                "USAGE_URL",
                "GATEWAY_LISTEN_ADDR",
            ],
        ),
    ];

    for (service, names) in &known {
        let set = environments
            .get(*service)
            .unwrap_or_else(|| panic!("compose has no `{service}` environment"));
        for key in set.keys() {
            assert!(
                names.contains(key),
                "compose sets `{key}` for {service}, which {service} does not read"
            );
        }
    }
    for (service, keys) in required {
        for key in keys {
            assert!(
                environments[service].contains_key(key),
                "compose does not set `{key}` for {service}"
            );
        }
    }
}

#[test]
fn compose_addresses_agree_with_each_other() {
    let compose = read("docker-compose.yml");
    let environments = compose_environments(&compose);
    let billing_port = port(&environments["billing"]["BILLING_LISTEN_ADDR"]).to_owned();
    let usage_port = port(&environments["usage"]["USAGE_LISTEN_ADDR"]).to_owned();
    let gateway_port = port(&environments["gateway"]["GATEWAY_LISTEN_ADDR"]).to_owned();
    let upstream_port = port(&environments["demo-upstream"]["DEMO_UPSTREAM_ADDR"]).to_owned();

    assert_eq!(
        environments["usage"]["BILLING_URL"],
        format!("http://billing:{billing_port}")
    );
    assert_eq!(
        environments["gateway"]["BILLING_URL"],
        format!("http://billing:{billing_port}")
    );
    assert_eq!(
        environments["gateway"]["USAGE_URL"],
        format!("http://usage:{usage_port}")
    );
    assert!(compose.contains(&format!("\"127.0.0.1:{gateway_port}:{gateway_port}\"")));
    assert!(compose.contains(&format!("\"127.0.0.1:{billing_port}:{billing_port}\"")));
    assert!(compose.contains(&format!(
        "./deploy/routes.toml:{}:ro",
        environments["gateway"]["GATEWAY_CONFIG"]
    )));
    let (_, routes) = gateway::routes::parse_routes_file(&read("deploy/routes.toml"))
        .expect("deploy/routes.toml parses");
    assert!(
        routes
            .routes()
            .iter()
            .all(|route| route.upstream_origin == format!("http://demo-upstream:{upstream_port}"))
    );
}

#[test]
fn every_variable_compose_takes_from_the_environment_is_in_env_example() {
    let compose = read("docker-compose.yml");
    let example = read(".env.example");
    let documented: BTreeSet<&str> = example
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.split_once('=').map(|(key, _)| key.trim()))
        .collect();

    let mut rest = compose.as_str();
    while let Some(start) = rest.find("${") {
        let reference = &rest[start + 2..];
        let name: String = reference
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            documented.contains(name.as_str()),
            "`{name}` is used by docker-compose.yml but not in .env.example"
        );
        rest = &reference[name.len()..];
    }
    let token_lengths = example
        .lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(key, _)| key.ends_with("_TOKEN"))
        .map(|(_, value)| value.len());
    assert!(
        token_lengths.into_iter().all(|length| length >= 16),
        "example tokens must pass the services' checks"
    );
}
