//! The deployment files in `deploy/`, checked with real tools: the compose
//! file against the Compose Specification's schema (check-jsonschema), the
//! Kubernetes manifests against Kubernetes' own schemas (kubernetes-validate,
//! strict), and what no schema says: every sagamesh service is health-checked
//! on the port it listens on, starts only once what it needs is healthy, and
//! the router is never replicated.
//!
//! In CI (`CI` set) missing tools fail the test; elsewhere the test says what
//! is missing and skips.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};

use crate::support::HANDLERS;

const COMPOSE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/compose.yaml");
const KUBERNETES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/kubernetes");

/// Whether a tool is present; in CI its absence is a failure.
fn available(what: &str, install: &str, mut probe: Command) -> bool {
    let present = probe.output().map(|o| o.status.success()).unwrap_or(false);
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "{what} is missing in CI; .ci/run installs it"
        );
        eprintln!("skipping: {what} is not installed ({install})");
    }
    present
}

fn tool(program: &str, probe_arg: &str) -> bool {
    let mut probe = Command::new(program);
    probe.arg(probe_arg);
    available(program, &format!("pip install {program}"), probe)
}

fn python_module(module: &str, package: &str) -> bool {
    let mut probe = Command::new("python3");
    probe.args(["-c", &format!("import {module}")]);
    available(
        &format!("python3 with {module}"),
        &format!("pip install {package}"),
        probe,
    )
}

fn run(command: &mut Command) -> (Output, String) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output, text)
}

/// The manifests, in the order `kubectl apply -f deploy/kubernetes/` takes
/// them.
fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(KUBERNETES)
        .expect("deploy/kubernetes/")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml" || ext == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {KUBERNETES}");
    files
}

#[test]
fn the_compose_file_follows_the_compose_specification() {
    if !tool("check-jsonschema", "--version") {
        return;
    }
    let (output, text) =
        run(Command::new("check-jsonschema").args(["--builtin-schema", "vendor.compose-spec", COMPOSE]));
    assert!(
        output.status.success(),
        "deploy/compose.yaml is not valid:\n{text}"
    );
    assert!(text.contains("ok"), "{text}");
}

#[test]
fn the_kubernetes_manifests_follow_the_kubernetes_schemas() {
    if !tool("kubernetes-validate", "--version") {
        return;
    }
    let files = manifests();
    let (output, text) = run(Command::new("kubernetes-validate").arg("--strict").args(&files));
    assert!(output.status.success(), "the manifests are not valid:\n{text}");
    // An unknown kind or apiVersion is only a warning to the tool: here it
    // is a mistake.
    assert!(
        !text.contains("WARN") && !text.contains("ERROR"),
        "the manifests are not clean:\n{text}"
    );
    for file in &files {
        assert!(
            text.contains(&format!("{} passed for resource", file.display())),
            "{} holds no resource that was validated:\n{text}",
            file.display()
        );
    }
}

/// One compose service, as the Python script below flattens it.
#[derive(Debug)]
struct ComposeService {
    name: String,
    image: String,
    replicas: String,
    health: String,
    command: Vec<String>,
    mode: String,
    depends: Vec<(String, String)>,
    router_token: String,
}

impl ComposeService {
    fn flag(&self, flag: &str) -> Option<&str> {
        let at = self.command.iter().position(|word| word == flag)?;
        self.command.get(at + 1).map(String::as_str)
    }

    fn listen_port(&self) -> &str {
        let listen = self
            .flag("--listen")
            .unwrap_or_else(|| panic!("{} has no --listen: {:?}", self.name, self.command));
        listen.rsplit(':').next().expect("a port")
    }

    fn depends_on(&self, other: &str) -> bool {
        self.depends.iter().any(|(name, _)| name == other)
    }
}

/// Loads the compose file with ruamel.yaml (check-jsonschema's YAML library,
/// so the file is read as it is validated, anchors and merges resolved) and
/// prints one tab-separated line per service.
const COMPOSE_SERVICES: &str = r#"
import sys
from ruamel.yaml import YAML

compose = YAML(typ="safe", pure=True).load(open(sys.argv[1]))

def words(value):
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return " ".join(str(word) for word in value)

for name, service in (compose.get("services") or {}).items():
    service = service or {}
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(
            item.split("=", 1) if "=" in item else (item, "") for item in environment
        )
    health = service.get("healthcheck") or {}
    test = health.get("test")
    if isinstance(test, str):
        test = "CMD-SHELL " + test
    if health.get("disable"):
        test = None
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        depends = {dependency: None for dependency in depends}
    replicas = (service.get("deploy") or {}).get("replicas", service.get("scale", 1))
    fields = [
        name,
        str(service.get("image", "")),
        str(replicas),
        words(test),
        words(service.get("command")),
        str(environment.get("SAGA_PATTERN_MODE", "")),
        ",".join(
            "%s=%s" % (dependency, (condition or {}).get("condition", "service_started"))
            for dependency, condition in depends.items()
        ),
        str(environment.get("SAGAMESH_ROUTER_TOKEN", "")),
    ]
    print("\t".join(field.replace("\t", " ").replace("\n", " ") for field in fields))
"#;

fn compose_services() -> Vec<ComposeService> {
    let (output, text) = run(Command::new("python3").args(["-c", COMPOSE_SERVICES, COMPOSE]));
    assert!(
        output.status.success(),
        "cannot read deploy/compose.yaml:\n{text}"
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields.len(), 8, "{line}");
            ComposeService {
                name: fields[0].to_owned(),
                image: fields[1].to_owned(),
                replicas: fields[2].to_owned(),
                health: fields[3].to_owned(),
                command: fields[4].split_whitespace().map(str::to_owned).collect(),
                mode: fields[5].to_owned(),
                depends: fields[6]
                    .split(',')
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (name, condition) = pair.split_once('=').expect("name=condition");
                        (name.to_owned(), condition.to_owned())
                    })
                    .collect(),
                router_token: fields[7].to_owned(),
            }
        })
        .collect()
}

#[test]
fn every_compose_service_is_health_checked_and_the_router_is_not_replicated() {
    if !python_module("ruamel.yaml", "check-jsonschema") {
        return;
    }
    let services = compose_services();
    let find = |name: &str| {
        services
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("deploy/compose.yaml has no service {name}"))
    };
    let ours: Vec<&ComposeService> = services.iter().filter(|s| s.image.contains("sagamesh")).collect();
    let names: BTreeSet<&str> = ours.iter().map(|s| s.name.as_str()).collect();
    let expected: BTreeSet<&str> = ["router", "coordinator"].into_iter().chain(HANDLERS).collect();
    assert_eq!(names, expected, "the sagamesh services of deploy/compose.yaml");

    for service in &ours {
        let port = service.listen_port();
        assert_eq!(
            service.health,
            format!("CMD grpc_health_probe -addr=localhost:{port}"),
            "{} must be health-checked on the port it listens on",
            service.name
        );
        assert_eq!(
            service.mode, "${SAGA_PATTERN_MODE:-choreography}",
            "{} takes its saga mode from the environment",
            service.name
        );
        assert!(
            service.router_token.starts_with("${SAGAMESH_ROUTER_TOKEN"),
            "{} takes the router token from the environment, as every service must",
            service.name
        );
    }
    // Whatever a service waits for must be healthy, so it needs a check.
    for service in &services {
        for (dependency, condition) in &service.depends {
            assert_eq!(
                condition, "service_healthy",
                "{} must wait until {dependency} is healthy",
                service.name
            );
            assert!(
                !find(dependency).health.is_empty(),
                "{} waits on {dependency}, which has no health check",
                service.name
            );
        }
    }

    let router = find("router");
    assert_eq!(router.command.first().map(String::as_str), Some("router"));
    assert_eq!(
        router.replicas, "1",
        "one router, so that a dead letter replay reaches every instance: the router must not be replicated"
    );
    assert!(router.flag("--bus").is_some_and(|bus| bus.starts_with("nats://")));
    assert!(router.depends_on("nats"));
    for name in HANDLERS {
        let handler = find(name);
        assert_eq!(handler.command[..2], ["handler", name], "{handler:?}");
        assert_eq!(handler.flag("--router"), Some("router:50060"), "{name}");
        assert!(
            handler
                .flag("--database")
                .is_some_and(|url| url.starts_with("postgres://")),
            "{name}"
        );
        assert!(
            handler.depends_on("router") && handler.depends_on("postgres"),
            "{handler:?}"
        );
    }
    let coordinator = find("coordinator");
    assert_eq!(
        coordinator.command.first().map(String::as_str),
        Some("coordinator")
    );
    assert_eq!(coordinator.flag("--inventory"), Some("inventory:50062"));
    assert!(
        coordinator
            .flag("--database")
            .is_some_and(|url| url.starts_with("postgres://"))
    );
    assert!(coordinator.depends_on("router") && coordinator.depends_on("inventory"));
    // Replicas share their state in PostgreSQL; the files show them.
    for service in ours.iter().filter(|s| s.name != "router") {
        let replicas: u32 = service.replicas.parse().expect("a number of replicas");
        assert!(replicas >= 2, "{} shows replicas: {replicas}", service.name);
    }
}

/// Loads every manifest with PyYAML (kubernetes-validate's YAML library) and
/// prints one tab-separated line per container of a Deployment or
/// StatefulSet.
const KUBERNETES_CONTAINERS: &str = r#"
import sys
import yaml

def grpc_port(probe):
    return str(((probe or {}).get("grpc") or {}).get("port", ""))

for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        spec = doc["spec"]
        for container in spec["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value", "") for e in container.get("env") or []}
            fields = [
                doc["metadata"]["name"],
                doc["kind"],
                str(spec.get("replicas", 1)),
                str((spec.get("strategy") or {}).get("type", "")),
                container["image"],
                env.get("SAGAMESH_LISTEN", ""),
                ",".join(str(p["containerPort"]) for p in container.get("ports") or []),
                grpc_port(container.get("readinessProbe")),
                grpc_port(container.get("livenessProbe")),
                "yes" if (container.get("resources") or {}).get("limits") else "",
                " ".join(sorted(env)),
            ]
            print("\t".join(fields))
"#;

#[test]
fn every_kubernetes_service_is_probed_on_its_port_and_the_router_is_not_replicated() {
    if !python_module("yaml", "kubernetes-validate") {
        return;
    }
    let files = manifests();
    let (output, text) = run(Command::new("python3")
        .args(["-c", KUBERNETES_CONTAINERS])
        .args(&files));
    assert!(output.status.success(), "cannot read the manifests:\n{text}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut seen = BTreeSet::new();
    for line in stdout.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), 11, "{line}");
        let [
            name,
            _kind,
            replicas,
            strategy,
            image,
            listen,
            ports,
            ready,
            live,
            limits,
            env,
        ] = fields[..]
        else {
            unreachable!()
        };
        assert_eq!(limits, "yes", "{name} has no resource limits");
        if !image.contains("sagamesh") {
            continue;
        }
        seen.insert(name.to_owned());
        let port = listen.rsplit(':').next().unwrap_or_default();
        assert!(!port.is_empty(), "{name} sets no SAGAMESH_LISTEN");
        assert_eq!(ports, port, "{name} exposes the port it listens on");
        assert_eq!(ready, port, "{name}'s readiness probe asks its own port");
        assert_eq!(live, port, "{name}'s liveness probe asks its own port");
        let env: BTreeSet<&str> = env.split_whitespace().collect();
        assert!(
            env.contains("SAGA_PATTERN_MODE"),
            "{name} sets no SAGA_PATTERN_MODE"
        );
        assert!(
            env.contains("SAGAMESH_ROUTER_TOKEN"),
            "{name} has no router token: the router would refuse it, or take anyone"
        );
        if name == "router" {
            assert_eq!(
                replicas, "1",
                "one router, so that a dead letter replay reaches every instance: the router must not be replicated"
            );
            assert_eq!(
                strategy, "Recreate",
                "a rollout must never run two routers at once (a replay would reach only one's instances)"
            );
            assert!(
                env.contains("SAGAMESH_BUS"),
                "the router keeps its events in NATS"
            );
        } else {
            let replicas: u32 = replicas.parse().expect("a number of replicas");
            assert!(replicas >= 2, "{name} shows replicas: {replicas}");
            assert!(
                env.contains("SAGAMESH_DATABASE"),
                "{name} keeps its state in PostgreSQL"
            );
        }
    }
    let expected: BTreeSet<String> = ["router", "coordinator"]
        .into_iter()
        .chain(HANDLERS)
        .map(str::to_owned)
        .collect();
    assert_eq!(seen, expected, "the sagamesh Deployments of deploy/kubernetes/");
}
