//! docker-compose.yml checked against the services' real configuration: every variable it sets is one the
//! service reads, the required ones are there, the addresses agree, and every secret it needs is in
//! .env.example. (No Docker engine runs here; this is what can be checked without one.)

use std::collections::{BTreeMap, BTreeSet};

use clap::{CommandFactory, Parser};

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
            "LOG_FORMAT".to_owned(),
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

/// Service name → the `command:` and healthcheck `test:` of each service built from the paygate image.
fn paygate_image_commands(compose: &str) -> BTreeMap<String, Vec<Vec<String>>> {
    let mut services = BTreeMap::new();
    let mut service: Option<String> = None;
    let mut in_services = false;
    for line in compose.lines() {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        match indent {
            0 => in_services = text == "services:",
            2 if in_services => service = text.strip_suffix(':').map(str::to_owned),
            4 if text == "<<: *paygate" => {
                let name = service.clone().expect("inside a service");
                services.insert(name, Vec::new());
            }
            _ => {}
        }
        let Some(name) = &service else { continue };
        let Some(commands) = services.get_mut(name) else {
            continue;
        };
        for key in ["command:", "test:"] {
            if let Some(list) = text.strip_prefix(key) {
                let words: Vec<String> =
                    serde_json::from_str(list.trim()).expect("a flow list of strings");
                commands.push(words);
            }
        }
    }
    services
}

/// The binaries the Dockerfile copies into the image.
fn image_binaries(dockerfile: &str) -> BTreeSet<String> {
    dockerfile
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("target/release/"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_command_and_healthcheck_runs_a_binary_the_image_has_with_arguments_it_takes() {
    let commands = paygate_image_commands(&read("docker-compose.yml"));
    let binaries = image_binaries(&read("Dockerfile"));

    for service in ["billing", "usage", "gateway", "demo-upstream"] {
        assert!(
            commands.get(service).is_some_and(|list| !list.is_empty()),
            "compose runs `{service}` without a command from the paygate image"
        );
    }
    for service in ["billing", "usage", "gateway"] {
        assert!(
            commands[service].iter().any(|words| words[0] == "CMD"),
            "`{service}` has no healthcheck"
        );
    }
    for (service, list) in &commands {
        for words in list {
            let argv: Vec<&str> = words
                .iter()
                .map(String::as_str)
                .skip_while(|word| *word == "CMD")
                .collect();
            assert!(
                binaries.contains(argv[0]),
                "{service} runs `{}`, which the image does not have ({binaries:?})",
                argv[0]
            );
            if argv[0] == "paygatectl" {
                paygatectl::Cli::try_parse_from(&argv)
                    .unwrap_or_else(|error| panic!("{service}: {argv:?}: {error}"));
            }
        }
    }
}

#[test]
fn the_image_has_roots_ports_and_a_default_command() {
    let dockerfile = read("Dockerfile");
    let runtime = dockerfile
        .rsplit("\nFROM ")
        .next()
        .expect("a runtime stage");
    let environments = compose_environments(&read("docker-compose.yml"));

    assert!(runtime.contains("ca-certificates"));
    assert!(runtime.contains("CMD [\"gateway\"]"));
    let exposed: BTreeSet<&str> = runtime
        .lines()
        .filter_map(|line| line.strip_prefix("EXPOSE "))
        .flat_map(str::split_whitespace)
        .collect();
    for (service, key) in [
        ("gateway", "GATEWAY_LISTEN_ADDR"),
        ("billing", "BILLING_LISTEN_ADDR"),
        ("usage", "USAGE_LISTEN_ADDR"),
        ("demo-upstream", "DEMO_UPSTREAM_ADDR"),
    ] {
        let listen_port = port(&environments[service][key]);
        assert!(
            exposed.contains(listen_port),
            "the image does not EXPOSE {listen_port} ({service})"
        );
    }
}

#[test]
fn compose_pins_every_image_to_a_release() {
    let compose = read("docker-compose.yml");

    for image in compose
        .lines()
        .filter_map(|line| line.trim().strip_prefix("image: "))
        .filter(|image| *image != "paygate:local")
    {
        let (_, tag) = image
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("`{image}` has no tag"));
        let version = tag.split('-').next().unwrap_or_default();
        assert!(
            version.contains('.'),
            "`{image}` floats: pin a release such as postgres:15.18"
        );
    }
}

#[test]
fn the_database_password_reaches_billing_outside_the_url_and_placeholders_say_change_me() {
    let environments = compose_environments(&read("docker-compose.yml"));
    let example = read(".env.example");

    let billing = &environments["billing"];
    assert_eq!(
        billing["DATABASE_URL"],
        "postgres://paygate@postgres:5432/paygate"
    );
    assert!(billing["DATABASE_PASSWORD"].starts_with("${POSTGRES_PASSWORD"));
    assert!(environments["postgres"]["POSTGRES_PASSWORD"].starts_with("${POSTGRES_PASSWORD"));
    for secret in [
        "POSTGRES_PASSWORD",
        "BILLING_ADMIN_TOKEN",
        "PAYGATE_SERVICE_TOKEN",
    ] {
        let value = example
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{secret}=")))
            .unwrap_or_else(|| panic!("{secret} is not in .env.example"));
        assert!(
            value.starts_with("change-me"),
            "{secret}: placeholders start with `change-me`, which the services refuse"
        );
    }
    assert!(example.contains("refuse"));
}
