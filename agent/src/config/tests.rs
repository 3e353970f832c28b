use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;
use crate::tables::Proto;

/// The smallest valid file; malformed cases append to it, so their lines start at 6.
const BASE: &str = "[node]
interfaces = [\"eth0\"]

[[plans]]
name = \"free\"
";

fn refuse(text: &str) -> ConfigError {
    match Config::parse(text, "t.toml") {
        Ok(c) => panic!("accepted:\n{text}\n{c:#?}"),
        Err(e) => e,
    }
}

/// Asserts the refusal's line, field and a fragment of its message (and the Display form).
#[track_caller]
fn assert_refused(text: &str, line: usize, field: &str, fragment: &str) {
    let e = refuse(text);
    assert_eq!(
        (e.line, e.field.as_str()),
        (Some(line), field),
        "wrong place for {e}\n--- in:\n{text}"
    );
    assert!(e.message.contains(fragment), "{e:?} lacks {fragment:?}");
    assert_eq!(e.file, "t.toml");
    assert_eq!(
        e.to_string(),
        format!("t.toml:{line}: {field}: {}", e.message)
    );
}

fn with(extra: &str) -> String {
    format!("{BASE}{extra}")
}

#[test]
fn embedded_default_is_valid() {
    let c = Config::embedded_default();
    assert_eq!(c.source, "<embedded default>");
    assert_eq!(c.node.interfaces, ["eth0"]);
    assert_eq!(c.node.xdp_mode, AttachMode::Auto);
    assert_eq!(c.listen.bind, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(c.endpoint_id("model"), Some(1));
    let bind = &c.endpoints[1];
    assert_eq!((bind.name.as_str(), bind.spec.anonymous), ("bind", true));
    assert_eq!(bind.port_ranges, [8443..=8443]);
    assert_eq!(
        c.plan("internal").map(|p| p.limits),
        Some(PlanLimits::UNLIMITED)
    );
    for plan in ["internal", "partner", "customer", "free", "batch"] {
        assert!(c.plan_index(plan).is_some(), "{plan}");
    }
    assert!(c.identities.is_empty());
}

#[test]
fn defaults_fill_absent_keys() {
    let c = Config::parse(BASE, "t.toml").unwrap();
    assert_eq!(
        c.node,
        Node {
            interfaces: vec!["eth0".into()],
            xdp_mode: AttachMode::Auto,
            pin_dir: "/sys/fs/bpf/tollgate".into(),
            state_dir: "/var/lib/tollgate".into(),
            control_socket: "/run/tollgate/control.sock".into(),
            control_group: "tollgate".into(),
            kernel_log: crate::loader::KernelLog::Off,
            audit_max_bytes: 64 * 1024 * 1024,
            tunnels: crate::tunnels::TunnelPolicy::Enforce,
        }
    );
    assert_eq!(
        c.anonymous,
        Anonymous {
            packets_per_second: 20,
            burst: 40
        }
    );
    assert_eq!(c.drop_events.interval_ms, 100);
    assert_eq!(
        c.controller,
        Controller {
            interval_ms: 250,
            pressure: 1.0,
            gpu_source: GpuSourceKind::Nvml,
            simulated_file: PathBuf::from("/run/tollgate/gpu-simulated.json"),
            saturate_at: 0.9,
            recover_at: 0.75,
            recover_after: 4,
            hold_back_floor: 0.1,
        }
    );
    assert_eq!(c.anomaly.mode, AnomalyMode::Shadow);
    assert_eq!(c.anomaly.thresholds[2], (6.0, 12.0));
    assert_eq!(c.listen.metrics, "127.0.0.1:9464".parse().unwrap());
    assert_eq!(c.plans[0].priority, 50);
    assert_eq!(c.plans[0].limits, PlanLimits::UNLIMITED);
    assert!(c.endpoints.is_empty() && c.identities.is_empty() && c.roles.is_empty());
}

const FULL: &str = r#"
[node]
interfaces = ["eth0", "ens1f0np0"]
xdp_mode = "native"
pin_dir = "/sys/fs/bpf/tg"
state_dir = "/srv/tollgate"
control_socket = "/run/tg.sock"
control_group = "ops"

[anonymous]
packets_per_second = 0
burst = 0

[drop_events]
interval_ms = 0

[controller]
interval_ms = 100
pressure = 1.5

[listen]
bind = "[::]:9443"
metrics = "127.0.0.1:9100"

[[plans]]
name = "internal"
priority = 100

[[plans]]
name = "free"
priority = 10
packets_per_second = 100
packet_burst = 200
bytes_per_second = 1_000_000
byte_burst = 2_000_000

[[endpoints]]
name = "vllm"
protocol = "tcp"
ports = [8000, "8001-8010"]
destinations = ["198.19.0.0/16", "2001:db8:ff::/48"]
weight = 2.5
classes = ["internal", "customer"]
roles = ["inference", "embedding"]

[[endpoints]]
name = "triton-grpc"
protocol = "udp"
ports = ["8000-8001"]
classes = ["partner"]
roles = ["embedding", "vision"]
anonymous = true

[[identities]]
name = "batch-cluster.eu"
class = "internal"
plan = "internal"
roles = ["inference", "admin"]
bind = ["198.18.0.0/24", "2001:db8:1::/48", "198.18.7.7", "0.0.0.0/0"]

[[identities]]
name = "acme"
class = "partner"
plan = "free"
bind = ["2001:db8:2::1"]
"#;

#[test]
fn full_example() {
    let c = Config::parse(FULL, "/etc/tollgate/tollgate.toml").unwrap();
    assert_eq!(c.source, "/etc/tollgate/tollgate.toml");
    assert_eq!(c.node.interfaces, ["eth0", "ens1f0np0"]);
    assert_eq!(c.node.xdp_mode, AttachMode::Native);
    assert_eq!(c.node.pin_dir, PathBuf::from("/sys/fs/bpf/tg"));
    assert_eq!(c.node.control_group, "ops");
    assert_eq!(
        c.anonymous,
        Anonymous {
            packets_per_second: 0,
            burst: 0
        }
    );
    assert_eq!(c.drop_events.interval_ms, 0);
    assert_eq!(c.controller.pressure, 1.5);
    assert_eq!(c.listen.bind, "[::]:9443".parse().unwrap());

    assert_eq!(c.plan_index("internal"), Some(0));
    assert_eq!(c.plan_index("free"), Some(1));
    assert_eq!(c.plan_index("gold"), None);
    assert_eq!(c.plans[0].limits, PlanLimits::UNLIMITED);
    assert_eq!(c.plans[1].priority, 10);
    assert_eq!(
        c.plans[1].limits,
        PlanLimits {
            packets_per_s: Some(100),
            packet_burst: 200,
            bytes_per_s: Some(1_000_000),
            byte_burst: 2_000_000,
        }
    );

    // Endpoints' roles first, in order of appearance, then identities' new ones.
    assert_eq!(c.roles, ["inference", "embedding", "vision", "admin"]);
    assert_eq!(c.role_bit("inference"), Some(1));
    assert_eq!(c.role_bit("admin"), Some(8));
    assert_eq!(c.role_bit("nobody"), None);

    assert_eq!(c.endpoint_id("vllm"), Some(1));
    assert_eq!(c.endpoint_id("triton-grpc"), Some(2));
    assert_eq!(c.endpoint_id("nope"), None);
    let vllm = &c.endpoints[0];
    assert_eq!(vllm.port_ranges, [8000..=8000, 8001..=8010]);
    assert_eq!(vllm.role_names, ["inference", "embedding"]);
    assert_eq!(
        vllm.spec,
        EndpointSpec {
            proto: Proto::Tcp,
            ports: 8000..=8000,
            v4_prefix: Some((Ipv4Addr::new(198, 19, 0, 0), 16)),
            v6_prefix: Some(("2001:db8:ff::".parse::<Ipv6Addr>().unwrap(), 48)),
            weight: 2.5,
            allowed_classes: vec![Class::Internal, Class::Customer],
            roles: 0b11,
            anonymous: false,
        }
    );
    let triton = &c.endpoints[1];
    assert_eq!(triton.spec.proto, Proto::Udp);
    assert_eq!(triton.spec.ports, 8000..=8001);
    assert_eq!(triton.spec.roles, 0b110);
    assert_eq!(triton.spec.weight, 1.0);
    assert_eq!((triton.spec.v4_prefix, triton.spec.v6_prefix), (None, None));
    assert!(triton.spec.anonymous);

    let batch = &c.identities[0];
    assert_eq!(batch.name, "batch-cluster.eu");
    assert_eq!(batch.class, Class::Internal);
    assert_eq!(batch.plan, "internal");
    assert_eq!(batch.roles, 0b1001);
    assert_eq!(batch.role_names, ["inference", "admin"]);
    assert_eq!(
        batch.bind,
        [
            ("198.18.0.0".parse().unwrap(), 24),
            ("2001:db8:1::".parse().unwrap(), 48),
            ("198.18.7.7".parse().unwrap(), 32),
            ("0.0.0.0".parse().unwrap(), 0),
        ]
    );
    let acme = &c.identities[1];
    assert_eq!((acme.class, acme.roles), (Class::Partner, 0));
    assert_eq!(acme.bind, [("2001:db8:2::1".parse().unwrap(), 128)]);
}

#[test]
fn unknown_top_level_key() {
    assert_refused(
        &format!("colour = \"blue\"\n{BASE}"),
        1,
        "colour",
        "unknown key `colour`",
    );
}

#[test]
fn unknown_key_in_an_endpoint() {
    let text = with(
        "
[[endpoints]]
name = \"a\"
protocol = \"tcp\"
ports = [8000]
classes = [\"internal\"]

[[endpoints]]
name = \"b\"
protocol = \"tcp\"
port = [9000]
",
    );
    assert_refused(&text, 16, "endpoints[1].port", "unknown key `port`");
}

#[test]
fn unknown_key_in_a_section() {
    assert_refused(
        &with("[controller]\nintervall_ms = 100\n"),
        7,
        "controller.intervall_ms",
        "unknown key `intervall_ms`",
    );
}

#[test]
fn ports_as_a_bare_string() {
    let text = with(
        "[[endpoints]]
name = \"a\"
protocol = \"tcp\"
ports = \"8000\"
classes = [\"internal\"]
",
    );
    assert_refused(
        &text,
        9,
        "endpoints[0].ports",
        "invalid type: string \"8000\", expected an array",
    );
}

#[test]
fn weight_not_a_number() {
    let text = with(
        "[[endpoints]]
name = \"a\"
protocol = \"tcp\"
ports = [8000]
classes = [\"internal\"]
weight = \"heavy\"
",
    );
    assert_refused(
        &text,
        11,
        "endpoints[0].weight",
        "invalid type: string \"heavy\", expected a number",
    );
}

#[test]
fn toml_syntax_error() {
    // An unquoted string.
    assert_refused(
        "[node]\ninterfaces = [\"eth0\"]\nxdp_mode = auto\n",
        3,
        "node.xdp_mode",
        "string values must be quoted",
    );
    // An unclosed array, found at the end of the line it starts on.
    assert_refused(
        "[node]\ninterfaces = [\"eth0\"\n",
        2,
        "node.interfaces",
        "unclosed array",
    );
}

#[test]
fn duplicate_key() {
    assert_refused(
        "[node]\ninterfaces = [\"eth0\"]\ninterfaces = [\"eth1\"]\n",
        3,
        "node.interfaces",
        "duplicate key",
    );
    assert_refused(
        &with("[[plans]]\nname = \"b\"\nname = \"c\"\n"),
        8,
        "plans[1].name",
        "duplicate key",
    );
}

#[test]
fn missing_required_key() {
    let text = with(
        "
[[endpoints]]
name = \"a\"
ports = [8000]
classes = [\"internal\"]
",
    );
    assert_refused(&text, 7, "endpoints[0].protocol", "this key is required");
    assert_refused(
        "[[plans]]\nname = \"free\"\n",
        1,
        "node",
        "this key is required",
    );
}

#[test]
fn no_plans() {
    assert_refused(
        "[node]\ninterfaces = [\"eth0\"]\n",
        1,
        "plans",
        "at least one [[plans]]",
    );
    assert_refused(
        "[node]\ninterfaces = [\"eth0\"]\n\nplans = []\n",
        4,
        "node.plans",
        "unknown key `plans`",
    );
    // In a table's body a key belongs to that table; at the top it is the list itself.
    assert_refused(
        "\nplans = []\n[node]\ninterfaces = [\"eth0\"]\n",
        2,
        "plans",
        "at least one [[plans]]",
    );
}

#[test]
fn packet_burst_zero() {
    let text = with("packets_per_second = 100\npacket_burst = 0\n");
    assert_refused(
        &text,
        7,
        "plans[0].packet_burst",
        "a burst of 0 is below one packet",
    );
}

#[test]
fn byte_burst_below_one_frame() {
    let text = with("bytes_per_second = 10_000\nbyte_burst = 1000\n");
    assert_refused(
        &text,
        7,
        "plans[0].byte_burst",
        "a burst of 1000 is below one full Ethernet frame (1518 bytes)",
    );
}

#[test]
fn rate_without_burst() {
    assert_refused(
        &with("packets_per_second = 100\n"),
        6,
        "plans[0].packet_burst",
        "packet_burst is required when packets_per_second is set",
    );
}

#[test]
fn burst_without_rate() {
    assert_refused(
        &with("byte_burst = 100000\n"),
        6,
        "plans[0].byte_burst",
        "byte_burst without bytes_per_second",
    );
}

#[test]
fn zero_rate() {
    assert_refused(
        &with("packets_per_second = 0\n"),
        6,
        "plans[0].packets_per_second",
        "0 is refused: leave packets_per_second out for unlimited",
    );
}

#[test]
fn duplicate_plan_and_bad_plan_name() {
    assert_refused(
        &with("[[plans]]\nname = \"free\"\n"),
        7,
        "plans[1].name",
        "plan \"free\" is defined twice (also plans[0])",
    );
    assert_refused(
        &with("[[plans]]\nname = \"Gold Tier\"\n"),
        7,
        "plans[1].name",
        "\"Gold Tier\" is not a valid name",
    );
}

#[test]
fn priority_out_of_range() {
    assert_refused(
        &with("priority = 101\n"),
        6,
        "plans[0].priority",
        "must be between 0 and 100",
    );
}

const TWO_TCP: &str = "
[[endpoints]]
name = \"a\"
protocol = \"tcp\"
ports = [\"8000-8010\"]
classes = [\"internal\"]

[[endpoints]]
name = \"b\"
protocol = \"tcp\"
ports = [9000, 8005]
classes = [\"internal\"]
";

#[test]
fn overlapping_endpoints() {
    let e = refuse(&with(TWO_TCP));
    assert_eq!((e.line, e.field.as_str()), (Some(16), "endpoints[1].ports"));
    assert!(
        e.message.contains(
            "tcp 8005 of endpoint \"b\" overlaps endpoint \"a\" (endpoints[0], tcp 8000-8010)"
        ),
        "{e}"
    );
    // The same ports on the other protocol are another endpoint's business.
    let udp = with(&TWO_TCP.replacen("\"tcp\"", "\"udp\"", 1));
    Config::parse(&udp, "t.toml").unwrap();
}

#[test]
fn overlapping_ranges_within_one_endpoint() {
    let text = with(
        "[[endpoints]]
name = \"a\"
protocol = \"udp\"
ports = [\"8000-8010\",
  8010]
classes = [\"internal\"]
",
    );
    assert_refused(
        &text,
        10,
        "endpoints[0].ports",
        "8010 overlaps 8000-8010 listed before it",
    );
}

#[test]
fn unknown_plan_in_an_identity() {
    let text = with(
        "
[[identities]]
name = \"acme\"
class = \"partner\"
plan = \"gold\"
bind = [\"198.18.0.0/24\"]
",
    );
    assert_refused(
        &text,
        10,
        "identities[0].plan",
        "unknown plan \"gold\" (plans: free)",
    );
}

#[test]
fn unknown_class() {
    let text = with(
        "[[identities]]
name = \"acme\"
class = \"vip\"
plan = \"free\"
bind = [\"198.18.0.0/24\"]
",
    );
    assert_refused(
        &text,
        8,
        "identities[0].class",
        "unknown class \"vip\": expected internal, partner or customer",
    );
    let text = with(
        "[[endpoints]]
name = \"a\"
protocol = \"tcp\"
ports = [80]
classes = [\"internal\", \"anonymous\"]
",
    );
    assert_refused(
        &text,
        10,
        "endpoints[0].classes",
        "\"anonymous\" is not a class to name here",
    );
}

#[test]
fn duplicate_endpoint_name() {
    let text = with(&TWO_TCP.replace("name = \"b\"", "name = \"a\""));
    assert_refused(
        &text,
        14,
        "endpoints[1].name",
        "endpoint \"a\" is defined twice (also endpoints[0])",
    );
}

#[test]
fn reversed_port_range() {
    let text = with(
        "[[endpoints]]
name = \"a\"
protocol = \"tcp\"
ports = [7000, \"9000-8000\"]
classes = [\"internal\"]
",
    );
    assert_refused(
        &text,
        9,
        "endpoints[0].ports",
        "port range 9000-8000 is reversed",
    );
}

#[test]
fn port_zero_and_out_of_range() {
    let endpoint = |ports: &str| {
        with(&format!(
            "[[endpoints]]\nname = \"a\"\nprotocol = \"tcp\"\nports = {ports}\n\
             classes = [\"internal\"]\n"
        ))
    };
    assert_refused(
        &endpoint("[0]"),
        9,
        "endpoints[0].ports",
        "port 0 is not a port",
    );
    assert_refused(
        &endpoint("[\"1-70000\"]"),
        9,
        "endpoints[0].ports",
        "port 70000 is out of range",
    );
    assert_refused(
        &endpoint("[\"http\"]"),
        9,
        "endpoints[0].ports",
        "\"http\" is neither a port nor a range",
    );
    assert_refused(
        &endpoint("[]"),
        9,
        "endpoints[0].ports",
        "at least one port is required",
    );
}

#[test]
fn destination_with_host_bits() {
    let text = with(
        "[[endpoints]]
name = \"a\"
protocol = \"tcp\"
ports = [8000]
destinations = [\"198.19.0.1/16\"]
classes = [\"internal\"]
",
    );
    assert_refused(
        &text,
        10,
        "endpoints[0].destinations",
        "198.19.0.1/16 has host bits set (did you mean 198.19.0.0/16?)",
    );
}

#[test]
fn two_ipv4_destinations() {
    let text = with(
        "[[endpoints]]
name = \"a\"
protocol = \"tcp\"
ports = [8000]
destinations = [\"198.19.0.0/16\", \"2001:db8::/32\", \"198.20.0.0/16\"]
classes = [\"internal\"]
",
    );
    assert_refused(
        &text,
        10,
        "endpoints[0].destinations",
        "a second IPv4 destination (198.20.0.0/16)",
    );
}

#[test]
fn weight_zero() {
    let text = with(
        "[[endpoints]]
name = \"a\"
protocol = \"tcp\"
ports = [8000]
classes = [\"internal\"]
weight = 0
",
    );
    assert_refused(
        &text,
        11,
        "endpoints[0].weight",
        "0 is out of range: it must be between 1/256",
    );
}

#[test]
fn empty_interfaces() {
    assert_refused(
        "[node]\ninterfaces = []\n[[plans]]\nname = \"free\"\n",
        2,
        "node.interfaces",
        "at least one interface is required",
    );
}

#[test]
fn bad_interface_names() {
    for (name, why) in [
        ("eth0/1", "contains '/'"),
        ("averyveryverylongname", "longer than 15 bytes"),
        ("..", "are not interface names"),
        ("eth 0", "whitespace"),
    ] {
        let text =
            format!("[node]\ninterfaces = [\"eth0\",\n \"{name}\"]\n[[plans]]\nname = \"x\"\n");
        assert_refused(&text, 3, "node.interfaces", why);
    }
}

#[test]
fn relative_pin_dir() {
    assert_refused(
        "[node]\ninterfaces = [\"eth0\"]\npin_dir = \"bpf/tollgate\"\n[[plans]]\nname = \"x\"\n",
        3,
        "node.pin_dir",
        "\"bpf/tollgate\" is not an absolute path",
    );
}

#[test]
fn unknown_xdp_mode() {
    assert_refused(
        "[node]\ninterfaces = [\"eth0\"]\nxdp_mode = \"offload\"\n[[plans]]\nname = \"x\"\n",
        3,
        "node.xdp_mode",
        "unknown XDP mode \"offload\"",
    );
}

#[test]
fn same_prefix_bound_to_two_identities() {
    let text = with(
        "[[identities]]
name = \"a\"
class = \"internal\"
plan = \"free\"
bind = [\"198.18.0.0/24\", \"2001:db8::1\"]

[[identities]]
name = \"b\"
class = \"partner\"
plan = \"free\"
bind = [\"198.18.1.0/24\",
  \"198.18.0.0/24\"]
",
    );
    assert_refused(
        &text,
        17,
        "identities[1].bind",
        "198.18.0.0/24 is already bound to identity \"a\" (identities[0])",
    );
}

#[test]
fn identity_bind_with_host_bits() {
    let text = with(
        "[[identities]]
name = \"a\"
class = \"internal\"
plan = \"free\"
bind = [\"2001:db8::1/64\"]
",
    );
    assert_refused(
        &text,
        10,
        "identities[0].bind",
        "2001:db8::1/64 has host bits set (did you mean 2001:db8::/64?)",
    );
}

#[test]
fn more_than_64_roles() {
    // 40 distinct roles on an endpoint, 25 more on an identity: the 65th is refused.
    let ep_roles: Vec<String> = (0..40).map(|i| format!("\"r{i}\"")).collect();
    let id_roles: Vec<String> = (0..26).map(|i| format!("\"r{}\"", 39 + i)).collect();
    let text = with(&format!(
        "[[endpoints]]
name = \"a\"
protocol = \"tcp\"
ports = [8000]
classes = [\"internal\"]
roles = [{}]

[[identities]]
name = \"b\"
class = \"internal\"
plan = \"free\"
bind = [\"198.18.0.0/24\"]
roles = [{},
  {}]
",
        ep_roles.join(", "),
        id_roles[..25].join(", "),
        id_roles[25],
    ));
    assert_refused(
        &text,
        19,
        "identities[0].roles",
        "role \"r64\" is the 65th distinct role: at most 64",
    );
    // Exactly 64 is fine, and the last one is bit 63.
    let text64 = text.replace(",\n  \"r64\"]", "]");
    let c = Config::parse(&text64, "t.toml").unwrap();
    assert_eq!(c.roles.len(), 64);
    assert_eq!(c.role_bit("r63"), Some(1 << 63));
    assert_eq!(c.identities[0].roles, u64::MAX << 39);
}

#[test]
fn controller_interval_zero() {
    assert_refused(
        &with("[controller]\ninterval_ms = 0\n"),
        7,
        "controller.interval_ms",
        "0 is out of range: it must be between 10 and 60000",
    );
}

#[test]
fn anonymous_burst_zero() {
    assert_refused(
        &with("[anonymous]\npackets_per_second = 5\nburst = 0\n"),
        8,
        "anonymous.burst",
        "a burst below one packet admits nothing",
    );
}

#[test]
fn negative_integer() {
    assert_refused(
        &with("[drop_events]\ninterval_ms = -1\n"),
        7,
        "drop_events.interval_ms",
        "-1 is out of range",
    );
}

#[test]
fn listen_addresses() {
    assert_refused(
        &with("[listen]\nbind = \"0.0.0.0\"\n"),
        7,
        "listen.bind",
        "is not an address and port",
    );
    assert_refused(
        &with("[listen]\nbind = \"0.0.0.0:9464\"\n"),
        7,
        "listen.bind",
        "listen.bind (0.0.0.0:9464) and listen.metrics (127.0.0.1:9464) cannot both listen",
    );
}

#[test]
fn too_many_endpoints() {
    let mut text = BASE.to_owned();
    for i in 0..64 {
        text.push_str(&format!(
            "[[endpoints]]\nname = \"e{i}\"\nprotocol = \"tcp\"\nports = [{}]\n\
             classes = [\"internal\"]\n",
            1000 + i
        ));
    }
    // The 64th endpoint's header is on line 6 + 63 * 5.
    assert_refused(&text, 321, "endpoints[63]", "at most 63 endpoints");
}

#[test]
fn unreadable_file() {
    let e = Config::load(Path::new("/nonexistent/tollgate.toml")).unwrap_err();
    assert_eq!(e.line, None);
    assert!(
        e.to_string()
            .starts_with("/nonexistent/tollgate.toml: cannot read the configuration:"),
        "{e}"
    );
}

#[test]
fn load_reads_a_file() {
    let path = std::env::temp_dir().join(format!("tollgate-config-{}.toml", std::process::id()));
    std::fs::write(&path, with("priority = 500\n")).unwrap();
    let e = Config::load(&path).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:6: plans[0].priority: 500 is out of range: it must be between 0 and 100",
            path.display()
        )
    );
}

const TOKENS: &str = "
[tokens]
jwks = \"/etc/tollgate/jwks.json\"
audience = \"pool-a\"
tls_cert = \"/etc/tollgate/cert.pem\"
tls_key = \"/etc/tollgate/key.pem\"
";

/// The endpoint `config check` wants on the bind listener's port once tokens are on.
const BIND_ENDPOINT: &str = "
[[endpoints]]
name = \"bind\"
protocol = \"tcp\"
ports = [8443]
classes = [\"internal\", \"partner\", \"customer\"]
anonymous = true
";

#[test]
fn tokens_section_defaults_and_values() {
    let c = Config::parse(&with(&format!("{TOKENS}{BIND_ENDPOINT}")), "t.toml").unwrap();
    let t = c.tokens.expect("tokens");
    assert_eq!(t.audience.as_deref(), Some("pool-a"));
    // The legacy keys are one issuer named `default`, with no `iss` check.
    assert_eq!(t.issuers.len(), 1);
    let d = &t.issuers[0];
    assert_eq!((d.name.as_str(), d.issuer.as_deref()), ("default", None));
    assert_eq!(d.audiences, ["pool-a"]);
    assert_eq!(
        d.source,
        KeySource::File(PathBuf::from("/etc/tollgate/jwks.json"))
    );
    assert_eq!(d.fetch, Fetch::default());
    assert_eq!(
        (d.claims.class.claim.as_str(), d.claims.plan.claim.as_str()),
        ("tollgate_class", "tollgate_plan")
    );
    assert_eq!(
        (t.max_ttl_s, t.clock_skew_s, t.max_token_bytes),
        (3600, 30, 8192)
    );
    assert_eq!(t.identity_claim, "sub");
    assert_eq!((t.default_class, t.default_plan), (None, None));
    assert!(Config::parse(BASE, "t.toml").unwrap().tokens.is_none());
    let c = Config::parse(
        &with(&format!("{TOKENS}default_plan = \"free\"\ndefault_class = \"partner\"\nidentity_claim = \"client_id\"\n{BIND_ENDPOINT}")),
        "t.toml",
    )
    .unwrap();
    let t = c.tokens.unwrap();
    assert_eq!(t.default_plan.as_deref(), Some("free"));
    assert_eq!(t.default_class, Some(Class::Partner));
    assert_eq!(t.identity_claim, "client_id");
}

#[test]
fn tokens_section_refusals() {
    assert_refused(
        &with(&format!("{TOKENS}default_plan = \"gold\"\n")),
        12,
        "tokens.default_plan",
        "unknown plan",
    );
    assert_refused(
        &with(&TOKENS.replace("/etc/tollgate/jwks.json", "jwks.json")),
        8,
        "tokens.jwks",
        "absolute",
    );
    assert_refused(
        &with(&format!("{TOKENS}max_ttl_s = 0\n")),
        12,
        "tokens.max_ttl_s",
        "out of range",
    );
    assert_refused(
        &with(&format!("{TOKENS}default_class = \"anonymous\"\n")),
        12,
        "tokens.default_class",
        "anonymous",
    );
    assert_refused(
        &with("\n[tokens]\naudience = \"x\"\n"),
        7,
        "tokens.tls_cert",
        "required",
    );
    let tls = "\n[tokens]\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n";
    assert_refused(
        &with(&format!("{tls}audience = \"x\"\n")),
        10,
        "tokens.jwks",
        "no tokens.jwks",
    );
    assert_refused(
        &with(&format!("{tls}jwks = \"/j.json\"\n")),
        10,
        "tokens.audience",
        "needs tokens.audience",
    );
    assert_refused(&with(tls), 7, "tokens", "no issuer");
}

#[test]
fn controller_and_anomaly_sections() {
    let c = Config::parse(
        &with("\n[controller]\ngpu_source = \"simulated\"\nsaturate_at = 0.8\nrecover_at = 0.5\n\n[anomaly]\nmode = \"enforce\"\n\n[anomaly.customer]\nthrottle_score = 4.0\nquarantine_score = 9.0\n"),
        "t.toml",
    )
    .unwrap();
    assert_eq!(c.controller.gpu_source, GpuSourceKind::Simulated);
    assert_eq!(
        (c.controller.saturate_at, c.controller.recover_at),
        (0.8, 0.5)
    );
    assert_eq!(c.anomaly.mode, AnomalyMode::Enforce);
    assert_eq!(c.anomaly.thresholds[2], (4.0, 9.0));
    assert_refused(
        &with("\n[controller]\nsaturate_at = 0.8\nrecover_at = 0.85\n"),
        9,
        "controller.recover_at",
        "flap",
    );
    assert_refused(
        &with("\n[controller]\ngpu_source = \"cuda\"\n"),
        8,
        "controller.gpu_source",
        "nvml",
    );
    assert_refused(
        &with("\n[anomaly]\nmode = \"loud\"\n"),
        8,
        "anomaly.mode",
        "shadow",
    );
    assert_refused(
        &with("\n[anomaly.partner]\nthrottle_score = 9.0\nquarantine_score = 3.0\n"),
        9,
        "anomaly.partner.quarantine_score",
        "below",
    );
}

#[test]
fn quotas_and_gpus() {
    let c = Config::parse(
        &format!("{BASE}quota_minute_bytes = 1000\nquota_month_cost = 5\n\n[[endpoints]]\nname = \"m\"\nprotocol = \"tcp\"\nports = [8000]\nclasses = [\"customer\"]\ngpus = [0, 3]\n"),
        "t.toml",
    )
    .unwrap();
    assert_eq!(c.plans[0].quota.minute_bytes, Some(1000));
    assert_eq!(c.plans[0].quota.month_cost, Some(5));
    assert_eq!(c.endpoints[0].gpus, [0, 3]);
    assert_refused(
        &format!("{BASE}quota_day_bytes = 0\n"),
        6,
        "plans[0].quota_day_bytes",
        "minimum",
    );
    let many: String = (0..17)
        .map(|i| format!("\n[[plans]]\nname = \"p{i}\"\n"))
        .collect();
    let e = refuse(&format!("[node]\ninterfaces = [\"eth0\"]\n{many}"));
    assert!(e.message.contains("too many plans"), "{e}");
}

#[test]
fn response_caps_parse_and_malformed_ones_are_refused_at_their_line() {
    use crate::controller::response::{ResponseLimits, ResponseOver};
    let c = Config::parse(
        &with("response_bytes_per_second = 50000\nresponse_quota_day_bytes = 1000000\nresponse_over = \"throttle\"\nresponse_throttle = 2.5\n"),
        "t.toml",
    )
    .unwrap();
    let r = c.plans[0].response;
    assert_eq!(
        (
            r.bytes_per_second,
            r.minute_bytes,
            r.day_bytes,
            r.month_bytes
        ),
        (Some(50_000), None, Some(1_000_000), None)
    );
    assert_eq!((r.over, r.q8()), (ResponseOver::Throttle, 640));
    let d = Config::parse(&with("response_quota_month_bytes = 7\n"), "t.toml").unwrap();
    assert_eq!(
        d.plans[0].response,
        ResponseLimits {
            month_bytes: Some(7),
            ..ResponseLimits::default()
        }
    );
    assert_eq!(
        (d.plans[0].response.over, d.plans[0].response.q8()),
        (ResponseOver::Drop, 0)
    );
    assert!(
        Config::parse(BASE, "t.toml").unwrap().plans[0]
            .response
            .is_unlimited()
    );
    let cap = "response_quota_minute_bytes = 10\n";
    for (extra, line, field, fragment) in [
        (
            "response_quota_minute_bytes = 0\n",
            6,
            "plans[0].response_quota_minute_bytes",
            "minimum",
        ),
        (
            "response_bytes_per_second = -5\n",
            6,
            "plans[0].response_bytes_per_second",
            "minimum",
        ),
        (
            "response_quota_day_bytes = 0\n",
            6,
            "plans[0].response_quota_day_bytes",
            "minimum",
        ),
        (
            "response_quota_month_bytes = 0\n",
            6,
            "plans[0].response_quota_month_bytes",
            "minimum",
        ),
        (
            "response_over = \"slow\"\n",
            6,
            "plans[0].response_over",
            "not a response_over",
        ),
        (
            "response_over = \"drop\"\n",
            6,
            "plans[0].response_over",
            "without a response cap",
        ),
        (
            "response_throttle = 1.0\n",
            6,
            "plans[0].response_throttle",
            "above 1",
        ),
    ] {
        assert_refused(&with(extra), line, field, fragment);
    }
    for (extra, fragment) in [
        (
            "response_over = \"throttle\"\nresponse_throttle = 1.0\n",
            "above 1",
        ),
        (
            "response_over = \"throttle\"\nresponse_throttle = 256.0\n",
            "at most 255",
        ),
        (
            "response_over = \"throttle\"\nresponse_throttle = nan\n",
            "out of range",
        ),
        ("response_throttle = 2.0\n", "only with response_over"),
    ] {
        assert_refused(
            &with(&format!("{cap}{extra}")),
            7 + extra.matches('\n').count() - 1,
            "plans[0].response_throttle",
            fragment,
        );
    }
    let e = refuse(&with("response_quota_day_bytes = \"lots\"\n"));
    assert_eq!(e.line, Some(6), "{e}");
}

#[test]
fn kernel_log_takes_a_level_and_refuses_others() {
    let c = Config::parse(
        &BASE.replace("[node]\n", "[node]\nkernel_log = \"warn\"\n"),
        "t.toml",
    )
    .unwrap();
    assert_eq!(c.node.kernel_log, crate::loader::KernelLog::Warn);
    assert_refused(
        &BASE.replace("[node]\n", "[node]\nkernel_log = \"loud\"\n"),
        2,
        "node.kernel_log",
        "expected off, error, warn, info or debug",
    );
}

#[test]
fn audit_max_bytes_is_a_size_of_at_least_64_kib() {
    let c = Config::parse(
        &BASE.replace("[node]\n", "[node]\naudit_max_bytes = 1048576\n"),
        "t.toml",
    )
    .unwrap();
    assert_eq!(c.node.audit_max_bytes, 1 << 20);
    assert_refused(
        &BASE.replace("[node]\n", "[node]\naudit_max_bytes = 1000\n"),
        2,
        "node.audit_max_bytes",
        "below the minimum of 65536",
    );
}

#[test]
fn tunnels_takes_a_policy_and_refuses_others() {
    for (label, want) in [
        ("enforce", crate::tunnels::TunnelPolicy::Enforce),
        ("refuse", crate::tunnels::TunnelPolicy::Refuse),
        ("warn", crate::tunnels::TunnelPolicy::Warn),
    ] {
        let c = Config::parse(
            &BASE.replace("[node]\n", &format!("[node]\ntunnels = \"{label}\"\n")),
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.node.tunnels, want);
    }
    assert_refused(
        &BASE.replace("[node]\n", "[node]\ntunnels = \"ignore\"\n"),
        2,
        "node.tunnels",
        "expected enforce (cover every decapsulating device), refuse",
    );
}

/// `[tokens]` without the legacy issuer: TLS files only. Lines of what follows start at 10.
const TLS_ONLY: &str = "
[tokens]
tls_cert = \"/etc/tollgate/cert.pem\"
tls_key = \"/etc/tollgate/key.pem\"
";

fn issuers(extra: &str) -> String {
    with(&format!("{TLS_ONLY}{extra}{BIND_ENDPOINT}"))
}

/// A plan `gold` beside the base's `free`, for value maps.
fn issuers_gold(extra: &str) -> String {
    format!("{BASE}\n[[plans]]\nname = \"gold\"\n{TLS_ONLY}{extra}{BIND_ENDPOINT}")
}

#[test]
fn issuers_with_each_key_source_and_a_claim_mapping() {
    let text = issuers_gold(
        "cache_max_s = 600
max_stale_s = 7200

[[tokens.issuers]]
name = \"corp\"
issuer = \"https://login.example.com/realms/corp\"
audiences = [\"pool-a\", \"pool-b\"]
discovery = true
cache_min_s = 10

[tokens.issuers.claims]
identity = \"client_id\"
roles = \"realm_access.roles\"
roles_required = true
class = \"tollgate_class\"
plan = { claim = \"groups\", values = { silver = \"free\", gold = \"gold\", bronze = \"free\" }, default = \"free\", unmapped = \"default\" }

[[tokens.issuers]]
name = \"partner-idp\"
issuer = \"https://idp.partner.example/\"
audience = \"pool-a\"
jwks_url = \"https://idp.partner.example/keys\"
ca_bundle = \"/etc/tollgate/partner-ca.pem\"

[tokens.issuers.claims]
roles = \"scope\"
roles_format = \"scope\"
class = { claim = \"tier\", values = { p = \"partner\" } }

[[tokens.issuers]]
name = \"files\"
issuer = \"https://files.example\"
audience = \"x\"
jwks = \"/etc/tollgate/files-jwks.json\"
",
    );
    let c = Config::parse(&text, "t.toml").unwrap();
    let t = c.tokens.unwrap();
    assert_eq!((t.jwks.as_ref(), t.audience.as_ref()), (None, None));
    let names: Vec<&str> = t.issuers.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["corp", "partner-idp", "files"]);
    let corp = t.issuer("corp").unwrap();
    assert_eq!(
        corp.issuer.as_deref(),
        Some("https://login.example.com/realms/corp")
    );
    assert_eq!(corp.audiences, ["pool-a", "pool-b"]);
    assert_eq!(corp.source, KeySource::Discovery);
    // [tokens]' settings are the defaults, an issuer's own keys override them.
    assert_eq!(
        (
            corp.fetch.cache_min_s,
            corp.fetch.cache_max_s,
            corp.fetch.max_stale_s,
            corp.fetch.refetch_cooldown_s
        ),
        (10, 600, 7200, 30)
    );
    assert_eq!(corp.claims.identity, "client_id");
    assert_eq!(corp.claims.roles, "realm_access.roles");
    assert!(corp.claims.roles_required && !corp.claims.roles_scope);
    assert_eq!(corp.claims.class.claim, "tollgate_class");
    assert!(corp.claims.class.values.is_empty());
    // File order kept: an array claim maps to the first value listed that it contains.
    let plan = &corp.claims.plan;
    assert_eq!(plan.claim, "groups");
    let order: Vec<(&str, &str)> = plan
        .values
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        order,
        [("silver", "free"), ("gold", "gold"), ("bronze", "free")]
    );
    assert_eq!(plan.default.as_deref(), Some("free"));
    assert!(plan.unmapped_default);
    let partner = t.issuer("partner-idp").unwrap();
    // Exactly as written: `iss` is compared byte for byte, trailing slash included.
    assert_eq!(
        partner.issuer.as_deref(),
        Some("https://idp.partner.example/")
    );
    assert_eq!(
        partner.source,
        KeySource::JwksUrl("https://idp.partner.example/keys".into())
    );
    assert_eq!(
        partner.fetch.ca_bundle.as_deref(),
        Some(Path::new("/etc/tollgate/partner-ca.pem"))
    );
    assert!(partner.claims.roles_scope);
    assert_eq!(
        partner.claims.class.values,
        [("p".to_owned(), "partner".to_owned())]
    );
    assert!(!partner.claims.class.unmapped_default);
    assert_eq!(partner.claims.identity, "sub");
    assert_eq!(
        t.issuer("files").unwrap().source,
        KeySource::File(PathBuf::from("/etc/tollgate/files-jwks.json"))
    );
}

#[test]
fn the_legacy_issuer_and_configured_ones_together() {
    let text = with(&format!(
        "{TOKENS}issuer = \"https://tollgate.example\"
[[tokens.issuers]]
name = \"idp\"
issuer = \"https://idp.example\"
audience = \"pool-a\"
discovery = true
{BIND_ENDPOINT}"
    ));
    let t = Config::parse(&text, "t.toml").unwrap().tokens.unwrap();
    let names: Vec<&str> = t.issuers.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["default", "idp"]);
    assert_eq!(
        t.issuers[0].issuer.as_deref(),
        Some("https://tollgate.example")
    );
    // `default` is the legacy issuer's name.
    assert_refused(
        &with(&format!(
            "{TOKENS}[[tokens.issuers]]\nname = \"default\"\nissuer = \"https://i.example\"\naudience = \"a\"\ndiscovery = true\n"
        )),
        13,
        "tokens.issuers[0].name",
        "tokens.jwks makes",
    );
    // Two issuers, one URL: a token's iss could not pick one.
    assert_refused(
        &with(&format!(
            "{TOKENS}issuer = \"https://i.example\"\n[[tokens.issuers]]\nname = \"b\"\nissuer = \"https://i.example\"\naudience = \"a\"\ndiscovery = true\n"
        )),
        15,
        "tokens.issuers[0].issuer",
        "issuer \"default\"'s too",
    );
}

const ISSUER: &str = "
[[tokens.issuers]]
name = \"idp\"
issuer = \"https://idp.example\"
audience = \"pool-a\"
";

#[test]
fn a_jwks_url_over_plain_http_is_refused() {
    assert_refused(
        &issuers(&format!("{ISSUER}jwks_url = \"http://idp.example/keys\"\n")),
        15,
        "tokens.issuers[0].jwks_url",
        "\"http://idp.example/keys\" is plain HTTP: keys fetched without TLS could be replaced",
    );
    assert_refused(
        &issuers(&format!("{ISSUER}jwks_url = \"ftp://idp.example/keys\"\n")),
        15,
        "tokens.issuers[0].jwks_url",
        "not an https URL",
    );
    assert_refused(
        &issuers(&ISSUER.replace("https://idp.example", "http://idp.example")),
        13,
        "tokens.issuers[0].issuer",
        "must start with https://",
    );
}

#[test]
fn issuer_refusals() {
    let src = "discovery = true\n";
    // Key sources: exactly one.
    assert_refused(&issuers(ISSUER), 11, "tokens.issuers[0]", "this one has 0");
    assert_refused(
        &issuers(&format!("{ISSUER}{src}jwks = \"/j.json\"\n")),
        11,
        "tokens.issuers[0]",
        "this one has 2",
    );
    assert_refused(
        &issuers(&format!("{ISSUER}discovery = false\n")),
        11,
        "tokens.issuers[0]",
        "exactly one of",
    );
    assert_refused(
        &issuers(&format!("{ISSUER}jwks = \"j.json\"\n")),
        15,
        "tokens.issuers[0].jwks",
        "absolute",
    );
    // Names and audiences.
    assert_refused(
        &issuers(&format!(
            "{}{src}",
            ISSUER.replace("\"idp\"", "\"Corp IdP\"")
        )),
        12,
        "tokens.issuers[0].name",
        "not a valid name",
    );
    assert_refused(
        &issuers(&format!(
            "{ISSUER}{src}{}{src}",
            ISSUER.replace("https://idp.example", "https://other.example")
        )),
        18,
        "tokens.issuers[1].name",
        "share this name",
    );
    assert_refused(
        &issuers(&format!("{ISSUER}{src}audiences = [\"b\"]\n")),
        16,
        "tokens.issuers[0].audiences",
        "not both",
    );
    assert_refused(
        &issuers(&format!(
            "{}{src}",
            ISSUER.replace("audience = \"pool-a\"", "audiences = []")
        )),
        14,
        "tokens.issuers[0].audiences",
        "1 to 16 audiences",
    );
    assert_refused(
        &issuers(&format!(
            "{}{src}",
            ISSUER.replace("audience = \"pool-a\"\n", "")
        )),
        11,
        "tokens.issuers[0].audience",
        "needs `audience`",
    );
    assert_refused(
        &issuers(&format!(
            "{}{src}",
            ISSUER.replace("idp.example", "idp.example?x=1")
        )),
        13,
        "tokens.issuers[0].issuer",
        "no query or fragment",
    );
    // Fetch settings.
    assert_refused(
        &issuers(&format!(
            "{ISSUER}{src}cache_min_s = 600\ncache_max_s = 60\n"
        )),
        16,
        "tokens.issuers[0].cache_min_s",
        "backwards",
    );
    assert_refused(
        &issuers(&format!("{ISSUER}{src}max_stale_s = 60\n")),
        16,
        "tokens.issuers[0].max_stale_s",
        "before their next scheduled refresh",
    );
    assert_refused(
        &issuers(&format!("{ISSUER}{src}refetch_cooldown_s = 0\n")),
        16,
        "tokens.issuers[0].refetch_cooldown_s",
        "out of range",
    );
    assert_refused(
        &with(&format!("{TLS_ONLY}jwks_max_bytes = 10\n{ISSUER}{src}")),
        10,
        "tokens.jwks_max_bytes",
        "out of range",
    );
    assert_refused(
        &issuers(&format!("{ISSUER}{src}ca_bundle = \"ca.pem\"\n")),
        16,
        "tokens.issuers[0].ca_bundle",
        "absolute",
    );
    assert_refused(
        &with(&format!(
            "{TLS_ONLY}issuer = \"https://x.example\"\n{ISSUER}{src}"
        )),
        10,
        "tokens.issuer",
        "no tokens.jwks",
    );
}

#[test]
fn an_issuer_may_be_limited_to_some_classes_and_plans() {
    let limited = format!(
        "{ISSUER}discovery = true\nclasses = [\"partner\", \"customer\"]\nplans = [\"gold\"]\n"
    );
    let t = Config::parse(&issuers_gold(&limited), "t.toml")
        .unwrap()
        .tokens
        .unwrap();
    let i = t.issuer("idp").unwrap();
    assert_eq!(
        (i.classes.as_deref(), i.plans.as_deref()),
        (
            Some(&["partner".to_owned(), "customer".to_owned()][..]),
            Some(&["gold".to_owned()][..])
        )
    );
    // A value map onto a class the issuer may not give could never place a token.
    assert_refused(
        &issuers_gold(&format!(
            "{limited}[tokens.issuers.claims]\nclass = {{ claim = \"g\", values = {{ staff = \"internal\" }} }}\n"
        )),
        14,
        "tokens.issuers[0].claims.class",
        "gives \"internal\", which is not in this issuer's classes (partner, customer)",
    );
    assert_refused(
        &issuers_gold(&format!(
            "{limited}[tokens.issuers.claims]\nplan = {{ claim = \"g\", default = \"free\" }}\n"
        )),
        14,
        "tokens.issuers[0].claims.plan",
        "gives \"free\", which is not in this issuer's plans (gold)",
    );
    assert_refused(
        &issuers_gold(&format!("{ISSUER}discovery = true\nclasses = []\n")),
        19,
        "tokens.issuers[0].classes",
        "would refuse every token",
    );
    assert_refused(
        &issuers_gold(&format!(
            "{ISSUER}discovery = true\nplans = [\"platinum\"]\n"
        )),
        19,
        "tokens.issuers[0].plans",
        "unknown plan",
    );
}

#[test]
fn claim_mapping_refusals() {
    let head = format!("{ISSUER}discovery = true\n[tokens.issuers.claims]\n");
    let claims = |extra: &str| issuers_gold(&format!("{head}{extra}"));
    // Lines: the claims table's first key is on line 20.
    assert_refused(
        &claims("plan = { claim = \"groups\", values = { gold = \"platinum\" } }\n"),
        20,
        "tokens.issuers[0].claims.plan.values.gold",
        "unknown plan \"platinum\"",
    );
    assert_refused(
        &claims("class = { claim = \"tier\", values = { a = \"gold\" } }\n"),
        20,
        "tokens.issuers[0].claims.class.values.a",
        "unknown class \"gold\"",
    );
    assert_refused(
        &claims("class = { claim = \"tier\", values = { a = \"anonymous\" } }\n"),
        20,
        "tokens.issuers[0].claims.class.values.a",
        "anonymous",
    );
    assert_refused(
        &claims("plan = { claim = \"groups\", default = \"nope\" }\n"),
        20,
        "tokens.issuers[0].claims.plan.default",
        "unknown plan",
    );
    assert_refused(
        &claims(
            "plan = { claim = \"groups\", values = { gold = \"gold\" }, unmapped = \"default\" }\n",
        ),
        20,
        "tokens.issuers[0].claims.plan.unmapped",
        "needs a `default`",
    );
    assert_refused(
        &claims(
            "plan = { claim = \"groups\", values = { gold = \"gold\" }, unmapped = \"keep\" }\n",
        ),
        20,
        "tokens.issuers[0].claims.plan.unmapped",
        "unknown unmapped",
    );
    assert_refused(
        &claims("plan = { claim = \"groups\", unmapped = \"refuse\" }\n"),
        20,
        "tokens.issuers[0].claims.plan.unmapped",
        "no `values`",
    );
    assert_refused(
        &claims("roles = \"realm_access..roles\"\n"),
        20,
        "tokens.issuers[0].claims.roles",
        "has an empty member name",
    );
    // A member name with dots, quoted (Auth0's namespaced claims), is one member.
    let t = Config::parse(
        &claims("roles = '\"https://example.com/roles\"'\n"),
        "t.toml",
    )
    .unwrap()
    .tokens
    .unwrap();
    assert_eq!(t.issuers[0].claims.roles, "\"https://example.com/roles\"");
    assert_refused(
        &claims("plan = \"exp\"\n"),
        20,
        "tokens.issuers[0].claims.plan",
        "registered claim",
    );
    assert_refused(
        &claims("roles_format = \"csv\"\n"),
        20,
        "tokens.issuers[0].claims.roles_format",
        "unknown roles_format",
    );
    assert_refused(
        &claims("plan = { values = { gold = \"gold\" } }\n"),
        20,
        "tokens.issuers[0].claims.plan.claim",
        "required",
    );
    assert_refused(
        &claims("plan = 3\n"),
        20,
        "tokens.issuers[0].claims.plan",
        "a claim path or a table",
    );
    assert_refused(
        &claims("groups = \"x\"\n"),
        20,
        "tokens.issuers[0].claims.groups",
        "unknown key",
    );
}

/// The packaged file's commented [tokens] example is a valid configuration once uncommented.
#[test]
fn the_packaged_tokens_example_is_valid() {
    let text = Config::embedded_default_text();
    let start = text.find("# [tokens]\n").expect("a [tokens] example");
    let example: String = text[start..]
        .lines()
        .filter_map(|l| l.strip_prefix("# ").or_else(|| (l == "#").then_some("")))
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let full = format!("{}\n{example}", &text[..start]);
    let c = Config::parse(&full, "example").unwrap_or_else(|e| panic!("{e}\n{full}"));
    let t = c.tokens.expect("tokens");
    let names: Vec<&str> = t.issuers.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["default", "corp"]);
    assert_eq!(t.issuer("corp").unwrap().source, KeySource::Discovery);
}

/// The token id: `jti` by default, a claim path per issuer (Entra ID's `uti`), derived from
/// the token when asked; the legacy issuer keeps `jti`, nothing derived.
#[test]
fn token_id_claim_and_derivation() {
    let t = Config::parse(&with(&format!("{TOKENS}{BIND_ENDPOINT}")), "t.toml")
        .unwrap()
        .tokens
        .unwrap();
    let legacy = &t.issuers[0].claims;
    assert_eq!(
        (legacy.token_id.as_str(), legacy.derive_token_id),
        ("jti", false)
    );
    let parsed = |claims: &str| {
        Config::parse(
            &issuers(&format!(
                "{ISSUER}discovery = true\n[tokens.issuers.claims]\n{claims}"
            )),
            "t.toml",
        )
        .map(|c| c.tokens.unwrap().issuers.remove(0).claims)
    };
    let entra = parsed("token_id = \"uti\"\n").unwrap();
    assert_eq!(
        (entra.token_id.as_str(), entra.derive_token_id),
        ("uti", false)
    );
    let dex = parsed("derive_token_id = true\n").unwrap();
    assert_eq!((dex.token_id.as_str(), dex.derive_token_id), ("jti", true));
    assert_eq!(parsed("token_id = \"jti\"\n").unwrap().token_id, "jti");
    let m = crate::token_bind::mapping_of(&entra, false).unwrap();
    assert_eq!(m.token_id, tollgate_common::token::ClaimPath::member("uti"));
    assert!(
        crate::token_bind::mapping_of(&dex, false)
            .unwrap()
            .derive_token_id
    );
    let head = format!("{ISSUER}discovery = true\n[tokens.issuers.claims]\n");
    assert_refused(
        &issuers(&format!("{head}token_id = \"exp\"\n")),
        17,
        "tokens.issuers[0].claims.token_id",
        "registered claim",
    );
    assert_refused(
        &issuers(&format!("{head}token_id = \"a..b\"\n")),
        17,
        "tokens.issuers[0].claims.token_id",
        "empty member name",
    );
    assert_refused(
        &issuers(&format!("{head}derive_token_id = \"yes\"\n")),
        17,
        "tokens.issuers[0].claims.derive_token_id",
        "",
    );
}

/// An issuer with no class (plan) rule places its tokens that carry no class (plan) claim
/// at `[tokens] default_class` (`default_plan`), as the legacy issuer does, instead of
/// refusing them `missing_claim`; its own rule, when it has one, has no such fallback.
#[test]
fn an_issuer_without_class_or_plan_rules_takes_the_tokens_defaults() {
    let defaults = "default_class = \"customer\"\ndefault_plan = \"gold\"\n";
    let parse = |text: &str| Config::parse(text, "t.toml").map(|c| c.tokens.unwrap());
    let t = parse(&issuers_gold(&format!(
        "{defaults}{ISSUER}discovery = true\n"
    )))
    .unwrap();
    let c = &t.issuer("idp").unwrap().claims;
    assert_eq!(
        (c.class.claim.as_str(), c.class.default.as_deref()),
        ("tollgate_class", Some("customer"))
    );
    assert_eq!(
        (c.plan.claim.as_str(), c.plan.default.as_deref()),
        ("tollgate_plan", Some("gold"))
    );
    let m = crate::token_bind::mapping_of(c, false).unwrap();
    assert_eq!(
        (m.class.default.as_deref(), m.plan.default.as_deref()),
        (Some("customer"), Some("gold"))
    );
    // Its own rule: its default only (none here → missing_claim when the claim is absent).
    let own = parse(&issuers_gold(&format!(
        "{defaults}{ISSUER}discovery = true\n[tokens.issuers.claims]\nplan = \"tier\"\n"
    )))
    .unwrap();
    let c = &own.issuer("idp").unwrap().claims;
    assert_eq!(c.plan.default, None);
    assert_eq!(c.class.default.as_deref(), Some("customer"));
    // No [tokens] default: nothing to fall back to.
    let bare = parse(&issuers_gold(&format!("{ISSUER}discovery = true\n"))).unwrap();
    let c = &bare.issuer("idp").unwrap().claims;
    assert_eq!(
        (c.class.default.as_ref(), c.plan.default.as_ref()),
        (None, None)
    );
    // The fallback must be a class the issuer may give.
    assert_refused(
        &issuers_gold(&format!(
            "{defaults}{ISSUER}discovery = true\nclasses = [\"partner\"]\n"
        )),
        16,
        "tokens.issuers[0].claims.class",
        "no claims.class rule, so its tokens without tollgate_class take \
         tokens.default_class \"customer\", which is not in its classes (partner)",
    );
}

/// An issuer's own `max_ttl_s` (Dex's 24 h tokens need not lengthen every issuer's), in the
/// global key's range; the revocation memory follows the longest of them.
#[test]
fn an_issuer_has_its_own_max_ttl() {
    let parse = |global: &str, own: &str| {
        Config::parse(
            &issuers(&format!("{global}{ISSUER}discovery = true\n{own}")),
            "t.toml",
        )
        .map(|c| c.tokens.unwrap())
    };
    let t = parse("", "").unwrap();
    assert_eq!((t.issuers[0].max_ttl_s, t.longest_ttl_s()), (3600, 3600));
    let t = parse("max_ttl_s = 600\n", "").unwrap();
    assert_eq!((t.issuers[0].max_ttl_s, t.longest_ttl_s()), (600, 600));
    let t = parse("max_ttl_s = 600\n", "max_ttl_s = 86400\n").unwrap();
    assert_eq!((t.issuers[0].max_ttl_s, t.longest_ttl_s()), (86400, 86400));
    let policy = crate::token_bind::policy_of(&t, &t.issuers[0]).unwrap();
    assert_eq!(policy.max_ttl_s, 86400);
    for bad in ["0", "604801", "-1"] {
        let e = parse("", &format!("max_ttl_s = {bad}\n")).unwrap_err();
        assert_eq!(e.field, "tokens.issuers[0].max_ttl_s", "{e}");
        assert!(e.message.contains("out of range"), "{e}");
    }
}

/// `none` is the metrics' issuer label of tokens no issuer was chosen for: an issuer so
/// named would have its refusals summed with those.
#[test]
fn the_issuer_name_none_is_reserved() {
    let text = issuers(&ISSUER.replace("name = \"idp\"", "name = \"none\""));
    let e = refuse(&text);
    assert_eq!(e.field, "tokens.issuers[0].name", "{e}");
    assert!(e.message.contains("reserved"), "{e}");
    assert!(Config::parse(&issuers(&format!("{ISSUER}discovery = true\n")), "t.toml").is_ok());
}

/// A static identity may carry an issuer's namespace (`partner:batch`): the name that
/// issuer's tokens have, so the operator can let them land on it. Each part is checked.
#[test]
fn a_static_identity_may_be_named_in_an_issuers_namespace() {
    let identity = |name: &str| {
        with(&format!(
            "[[identities]]\nname = \"{name}\"\nclass = \"partner\"\nplan = \"free\"\n\
             bind = [\"198.18.0.10\"]\n"
        ))
    };
    for ok in ["partner:batch", "partner:batch.cluster", "a_b-c:x"] {
        let c = Config::parse(&identity(ok), "t.toml").unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert!(c.identity(ok).is_some(), "{ok}");
    }
    for bad in [
        ":batch",
        "partner:",
        "Partner:batch",
        "a:b:c",
        "a.b:c",
        &format!("{}:x", "p".repeat(33)),
    ] {
        let e = refuse(&identity(bad));
        assert_eq!(
            e.field.split(' ').next(),
            Some("identities[0].name"),
            "{bad}: {e}"
        );
    }
}

/// `[fleet]`: every refusal names its line and field; the files are checked with the fleet
/// module's own loaders (so these tests make real key, credentials and CA files).
mod fleet {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::token_bind::tests::Dir;

    const PASSWORD: &str = "s3cret-store-pw";

    /// A pool key (mode 0600), a credentials file (0600) and a CA certificate.
    struct Files {
        dir: Dir,
        key: String,
        creds: String,
        ca: String,
    }

    fn files(tag: &str) -> Files {
        let dir = Dir::new("config-fleet", tag);
        let key = dir.0.join("pool.key");
        crate::fleet::entry::write_key_file(&key).expect("key");
        let creds = dir.0.join("store.creds");
        std::fs::write(
            &creds,
            format!("user = \"tollgate\"\npassword = \"{PASSWORD}\"\n"),
        )
        .expect("creds");
        chmod(&creds, 0o600);
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = dir.0.join("ca.pem");
        std::fs::write(&ca, params.self_signed(&ca_key).expect("ca").pem()).expect("ca");
        let s = |p: std::path::PathBuf| p.display().to_string();
        Files {
            key: s(key),
            creds: s(creds),
            ca: s(ca),
            dir,
        }
    }

    fn chmod(p: &std::path::Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// `[fleet]` is on line 6 (after BASE), `store` on 7, `pool` 8, `node` 9, `pool_key` 10,
    /// `extra` from 11.
    fn fleet(store: &str, key: &str, extra: &str) -> String {
        with(&format!(
            "[fleet]\n{store}\npool = \"lab\"\nnode = \"node-1\"\npool_key = \"{key}\"\n{extra}"
        ))
    }

    const PLAIN: &str = "store = \"redis://198.18.0.10:6379\"";
    const TLS: &str = "store = \"rediss://store.example:6380\"";

    #[test]
    fn defaults_fill_absent_keys() {
        let f = files("defaults");
        let c = Config::parse(&fleet(PLAIN, &f.key, ""), "t.toml").expect("valid");
        assert_eq!(
            c.fleet,
            Some(Fleet {
                store: FleetStore::Url {
                    url: "redis://198.18.0.10:6379".into(),
                    tls: false
                },
                ca_file: None,
                credentials: None,
                pool_key: f.key.clone().into(),
                pool: "lab".into(),
                node: "node-1".into(),
                sync_interval_ms: 250,
                op_timeout_ms: 500,
                stream_max_len: 100_000,
                outage: Outage {
                    quotas: OutageMode::Share,
                    rates: OutageMode::Share,
                },
                line: 6,
            })
        );
        // Without [fleet] there is no fleet, and nothing to refuse.
        let c = Config::parse(BASE, "t.toml").unwrap();
        assert_eq!(c.fleet, None);
    }

    #[test]
    fn every_key_set_is_taken() {
        let f = files("every-key");
        let text = fleet(
            TLS,
            &f.key,
            &format!(
                "ca_file = \"{}\"\ncredentials = \"{}\"\nsync_interval_ms = 50\n\
                 op_timeout_ms = 5000\nstream_max_len = 1000\n\
                 outage = {{ quotas = \"closed\", rates = \"local\" }}\n",
                f.ca, f.creds
            ),
        );
        let got = Config::parse(&text, "t.toml")
            .expect("valid")
            .fleet
            .unwrap();
        assert_eq!(
            got.store,
            FleetStore::Url {
                url: "rediss://store.example:6380".into(),
                tls: true
            }
        );
        assert_eq!(got.ca_file, Some(f.ca.clone().into()));
        assert_eq!(got.credentials, Some(f.creds.clone().into()));
        assert_eq!(
            (got.sync_interval_ms, got.op_timeout_ms, got.stream_max_len),
            (50, 5000, 1000)
        );
        assert_eq!(
            got.outage,
            Outage {
                quotas: OutageMode::Closed,
                rates: OutageMode::Local
            }
        );
        // The password is read to check the file, and kept nowhere in the configuration.
        assert!(!format!("{got:?}").contains(PASSWORD));
    }

    #[test]
    fn a_store_that_is_not_redis_is_refused() {
        let f = files("scheme");
        for (url, fragment) in [
            ("http://198.18.0.10:6379", "not HTTP"),
            ("https://198.18.0.10:6379", "not HTTP"),
            ("tcp://198.18.0.10:6379", "use redis://host:port"),
            ("198.18.0.10:6379", "is not a store URL"),
            ("unix:///run/redis.sock", "use redis://host:port"),
            // The crate's switch for "no certificate check" is never taken from a file.
            ("rediss://store.example:6380#insecure", "#insecure"),
            ("redis://198.18.0.10:6379/?protocol=3", "query or fragment"),
            ("redis://0.0.0.0:6379", "wildcard"),
            ("redis://198.18.0.10:6379/x", "database"),
        ] {
            let text = fleet(&format!("store = \"{url}\""), &f.key, "");
            assert_refused(&text, 7, "fleet.store", fragment);
        }
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_echoing_it() {
        let f = files("url-password");
        let text = fleet(
            &format!("store = \"redis://tollgate:{PASSWORD}@198.18.0.10:6379\""),
            &f.key,
            "",
        );
        assert_refused(&text, 7, "fleet.store", "`credentials`");
        assert!(!refuse(&text).to_string().contains(PASSWORD));
    }

    #[test]
    fn exactly_one_of_store_and_sentinel() {
        let f = files("one-store");
        let sentinel = "sentinel = { service = \"tollgate\", nodes = [\"198.18.0.11:26379\"] }\n";
        assert_refused(
            &fleet(PLAIN, &f.key, sentinel),
            11,
            "fleet.sentinel",
            "not both",
        );
        let text = with(&format!(
            "[fleet]\npool = \"lab\"\nnode = \"node-1\"\npool_key = \"{}\"\n",
            f.key
        ));
        assert_refused(&text, 6, "fleet.store", "the store is required");
    }

    #[test]
    fn sentinel_is_checked() {
        let f = files("sentinel");
        let text = |body: &str| {
            with(&format!(
                "[fleet]\npool = \"lab\"\nnode = \"node-1\"\npool_key = \"{}\"\n\
                 [fleet.sentinel]\n{body}",
                f.key
            ))
        };
        let ok = text(
            "service = \"tollgate\"\nnodes = [\"198.18.0.11:26379\", \"[2001:db8::12]:26379\", \
             \"sentinel-3.example:26379\"]\n",
        );
        assert_eq!(
            Config::parse(&ok, "t.toml")
                .expect("valid")
                .fleet
                .unwrap()
                .store,
            FleetStore::Sentinel {
                service: "tollgate".into(),
                nodes: vec![
                    "198.18.0.11:26379".into(),
                    "[2001:db8::12]:26379".into(),
                    "sentinel-3.example:26379".into()
                ],
                tls: false,
            }
        );
        // [fleet.sentinel] is line 10, service 11, nodes 12.
        assert_refused(
            &text("service = \"tollgate\"\nnodes = [\"198.18.0.11\"]\n"),
            12,
            "fleet.sentinel.nodes",
            "no port",
        );
        assert_refused(
            &text(
                "service = \"tollgate\"\nnodes = [\"198.18.0.11:26379\", \"198.18.0.11:26379\"]\n",
            ),
            12,
            "fleet.sentinel.nodes",
            "listed twice",
        );
        assert_refused(
            &text("service = \"tollgate\"\nnodes = []\n"),
            12,
            "fleet.sentinel.nodes",
            "0 sentinels",
        );
        assert_refused(
            &text("service = \"my master\"\nnodes = [\"198.18.0.11:26379\"]\n"),
            11,
            "fleet.sentinel.service",
            "not a service name",
        );
        // A CA file needs TLS to the sentinels too.
        let with_ca = with(&format!(
            "[fleet]\npool = \"lab\"\nnode = \"node-1\"\npool_key = \"{}\"\nca_file = \"{}\"\n\
             sentinel = {{ service = \"tollgate\", nodes = [\"198.18.0.11:26379\"] }}\n",
            f.key, f.ca
        ));
        assert_refused(&with_ca, 10, "fleet.ca_file", "`tls = true`");
        let tls = with_ca.replace("] }", "], tls = true }");
        let got = Config::parse(&tls, "t.toml").expect("valid").fleet.unwrap();
        assert!(got.store.tls());
        assert_eq!(got.ca_file, Some(f.ca.clone().into()));
    }

    #[test]
    fn a_ca_file_needs_tls_and_a_certificate() {
        let f = files("ca");
        let ca = |p: &str| format!("ca_file = \"{p}\"\n");
        assert_refused(
            &fleet(PLAIN, &f.key, &ca(&f.ca)),
            11,
            "fleet.ca_file",
            "use rediss://",
        );
        let missing = f.dir.0.join("nope.pem").display().to_string();
        assert_refused(
            &fleet(TLS, &f.key, &ca(&missing)),
            11,
            "fleet.ca_file",
            "No such file",
        );
        let not_pem = f.dir.0.join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        assert_refused(
            &fleet(TLS, &f.key, &ca(&not_pem.display().to_string())),
            11,
            "fleet.ca_file",
            "no PEM certificate",
        );
        assert_refused(
            &fleet(TLS, &f.key, &ca("ca.pem")),
            11,
            "fleet.ca_file",
            "not an absolute path",
        );
        Config::parse(&fleet(TLS, &f.key, &ca(&f.ca)), "t.toml").expect("valid");
    }

    #[test]
    fn the_credentials_file_is_loaded_as_the_store_loads_it() {
        let f = files("credentials");
        let creds = |p: &str| format!("credentials = \"{p}\"\n");
        let missing = f.dir.0.join("nope").display().to_string();
        assert_refused(
            &fleet(PLAIN, &f.key, &creds(&missing)),
            11,
            "fleet.credentials",
            "No such file",
        );
        chmod(std::path::Path::new(&f.creds), 0o644);
        assert_refused(
            &fleet(PLAIN, &f.key, &creds(&f.creds)),
            11,
            "fleet.credentials",
            "accessible to other users",
        );
        chmod(std::path::Path::new(&f.creds), 0o600);
        std::fs::write(&f.creds, format!("password = \"{PASSWORD}\"\n")).unwrap();
        let text = fleet(PLAIN, &f.key, &creds(&f.creds));
        assert_refused(&text, 11, "fleet.credentials", "not `user");
        assert!(!refuse(&text).to_string().contains(PASSWORD));
    }

    #[test]
    fn the_pool_key_is_loaded_as_the_store_loads_it() {
        let f = files("pool-key");
        let missing = f.dir.0.join("nope.key").display().to_string();
        assert_refused(
            &fleet(PLAIN, &missing, ""),
            10,
            "fleet.pool_key",
            "No such file",
        );
        assert_refused(
            &fleet(PLAIN, "pool.key", ""),
            10,
            "fleet.pool_key",
            "absolute path",
        );
        chmod(std::path::Path::new(&f.key), 0o644);
        assert_refused(
            &fleet(PLAIN, &f.key, ""),
            10,
            "fleet.pool_key",
            "accessible to other users",
        );
        chmod(std::path::Path::new(&f.key), 0o640);
        Config::parse(&fleet(PLAIN, &f.key, ""), "t.toml").expect("0640 is fine");
        std::fs::write(&f.key, "00112233\n").unwrap();
        assert_refused(
            &fleet(PLAIN, &f.key, ""),
            10,
            "fleet.pool_key",
            "at least 32",
        );
        std::fs::write(&f.key, "not hex\n").unwrap();
        assert_refused(&fleet(PLAIN, &f.key, ""), 10, "fleet.pool_key", "not hex");
        // Required.
        let text =
            with("[fleet]\nstore = \"redis://198.18.0.10:6379\"\npool = \"lab\"\nnode = \"n\"\n");
        assert_refused(&text, 6, "fleet.pool_key", "required");
    }

    #[test]
    fn pool_and_node_names_follow_the_store_rule() {
        let f = files("names");
        let text = |pool: &str, node: &str| {
            with(&format!(
                "[fleet]\n{PLAIN}\npool = \"{pool}\"\nnode = \"{node}\"\npool_key = \"{}\"\n",
                f.key
            ))
        };
        let long = "n".repeat(65);
        for bad in ["", "a b", "pool{1}", "a:b", long.as_str()] {
            assert_refused(&text(bad, "node-1"), 8, "fleet.pool", "not a valid name");
            assert_refused(&text("lab", bad), 9, "fleet.node", "not a valid name");
        }
        let ok = "Node-1.rack_2";
        assert_eq!(
            Config::parse(&text("lab", ok), "t.toml")
                .unwrap()
                .fleet
                .unwrap()
                .node,
            ok
        );
    }

    #[test]
    fn intervals_and_lengths_are_bounded() {
        let f = files("bounds");
        for (key, bad, ok) in [
            ("sync_interval_ms", [49, 10_001], [50, 10_000]),
            ("op_timeout_ms", [49, 5_001], [50, 5_000]),
            ("stream_max_len", [999, 1_000_001], [1_000, 1_000_000]),
        ] {
            for b in bad {
                let text = fleet(PLAIN, &f.key, &format!("{key} = {b}\n"));
                assert_refused(&text, 11, &format!("fleet.{key}"), "out of range");
            }
            for o in ok {
                Config::parse(&fleet(PLAIN, &f.key, &format!("{key} = {o}\n")), "t.toml")
                    .unwrap_or_else(|e| panic!("{key} = {o}: {e}"));
            }
        }
    }

    #[test]
    fn an_unknown_outage_mode_is_refused() {
        let f = files("outage");
        for kind in ["quotas", "rates"] {
            let text = fleet(
                PLAIN,
                &f.key,
                &format!("[fleet.outage]\n{kind} = \"open\"\n"),
            );
            assert_refused(
                &text,
                12,
                &format!("fleet.outage.{kind}"),
                "\"open\" is not an outage mode: share, local, closed",
            );
        }
        let text = fleet(PLAIN, &f.key, "[fleet.outage]\nquotas = \"local\"\n");
        let o = Config::parse(&text, "t.toml")
            .unwrap()
            .fleet
            .unwrap()
            .outage;
        assert_eq!((o.quotas, o.rates), (OutageMode::Local, OutageMode::Share));
        let text = fleet(PLAIN, &f.key, "[fleet.outage]\nstore = \"share\"\n");
        assert_refused(&text, 12, "fleet.outage.store", "unknown key");
    }

    /// `run` and reload (both load through `daemon::load_config`) take `[fleet.outage]` and
    /// fleet-wide plans; a fleet-wide plan without `[fleet]` is refused with its line.
    #[test]
    fn run_and_reload_take_fleet_outage_and_fleet_wide_plans() {
        let f = files("wired");
        let path = f.dir.0.join("tollgate.toml");
        let opts = crate::daemon::Options {
            config: Some(path.clone()),
            ..Default::default()
        };
        std::fs::write(
            &path,
            fleet(PLAIN, &f.key, "[fleet.outage]\nquotas = \"local\"\n"),
        )
        .unwrap();
        let c = crate::daemon::load_config(&opts).expect("[fleet.outage] runs");
        assert_eq!(c.fleet.unwrap().outage.quotas, OutageMode::Local);
        let plan = "[[plans]]\nname = \"g\"\npackets_per_second = 100\npacket_burst = 10\n\
                    scope = \"fleet\"\n";
        let text = fleet(PLAIN, &f.key, "").replacen("[[plans]]", &format!("{plan}\n[[plans]]"), 1);
        std::fs::write(&path, &text).unwrap();
        let c = crate::daemon::load_config(&opts).expect("a fleet-wide plan runs");
        assert!(c.plan("g").unwrap().fleet_wide());
        // The same plan on a node of its own: refused, not silently per node.
        let alone = format!("{BASE}\n{plan}");
        let e = Config::parse(&alone, "t.toml").expect_err("refused");
        assert_eq!(e.field, "plans[1].scope", "{e}");
        assert!(e.message.contains("needs a [fleet] table"), "{e}");
        let bad = alone.replace("\"fleet\"", "\"pool\"");
        let e = Config::parse(&bad, "t.toml").expect_err("refused");
        assert!(e.message.contains("is not a scope"), "{e}");
    }
}

/// An endpoint after BASE (its `[[endpoints]]` line is line 7), with `extra` from line 12.
fn flow_endpoint(proto: &str, extra: &str) -> String {
    with(&format!(
        "\n[[endpoints]]\nname = \"api\"\nprotocol = \"{proto}\"\nports = [8000]\nclasses = \
         [\"customer\"]\n{extra}"
    ))
}

#[test]
fn flow_keys_default_to_tracking_tcp_without_caps() {
    use tollgate_common::flow::{FP_TRACK, FlowPolicy};
    let c = Config::parse(&flow_endpoint("tcp", ""), "t.toml").unwrap();
    let want = FlowPolicy {
        flags: FP_TRACK,
        ..FlowPolicy::default()
    };
    assert_eq!(c.endpoints[0].flow, want);
    let c = Config::parse(&flow_endpoint("udp", ""), "t.toml").unwrap();
    assert_eq!(c.endpoints[0].flow, FlowPolicy::default());
    let c = Config::parse(
        &flow_endpoint(
            "tcp",
            "max_request_bytes = 1048576\nmax_unanswered_bytes = 4194304\n",
        ),
        "t.toml",
    )
    .unwrap();
    assert_eq!(
        c.endpoints[0].flow,
        FlowPolicy {
            flags: FP_TRACK,
            _pad: 0,
            max_request_bytes: 1 << 20,
            max_unanswered_bytes: 4 << 20,
        }
    );
    let c = Config::parse(&flow_endpoint("tcp", "track_flows = false\n"), "t.toml").unwrap();
    assert_eq!(c.endpoints[0].flow, FlowPolicy::default());
}

#[test]
fn flow_keys_are_refused_where_they_cannot_hold() {
    assert_refused(
        &flow_endpoint("tcp", "track_flows = false\nmax_request_bytes = 65536\n"),
        12,
        "endpoints[0].track_flows",
        "caps are counted per tracked flow",
    );
    assert_refused(
        &flow_endpoint("udp", "max_request_bytes = 65536\n"),
        12,
        "endpoints[0].max_request_bytes",
        "TCP endpoints only",
    );
    assert_refused(
        &flow_endpoint("udp", "track_flows = true\n"),
        12,
        "endpoints[0].track_flows",
        "TCP endpoints only",
    );
    assert_refused(
        &flow_endpoint("tcp", "max_request_bytes = 100\n"),
        12,
        "endpoints[0].max_request_bytes",
        "at least 4096",
    );
    assert_refused(
        &flow_endpoint("tcp", "max_unanswered_bytes = -1\n"),
        12,
        "endpoints[0].max_unanswered_bytes",
        "",
    );
    assert_refused(
        &flow_endpoint(
            "tcp",
            "max_request_bytes = 1048576\nmax_unanswered_bytes = 65536\n",
        ),
        13,
        "endpoints[0].max_unanswered_bytes",
        "at least max_request_bytes",
    );
}

#[test]
fn limits_flows_has_the_floor_of_an_lru() {
    let text = with("\n[limits]\nflows = 100\n");
    assert_refused(&text, 8, "limits.flows", "");
    let c = Config::parse(&with("\n[limits]\nflows = 4096\n"), "t.toml").unwrap();
    assert_eq!(c.limits.sizes.flows, 4096);
}

#[test]
fn token_and_money_plans_and_the_price_table_parse_exactly() {
    let c = Config::parse(
        &with(
            "tokens_per_minute = 50000\nbudget_per_day = 0.25\nbudget_per_month = \"12.000000001\"\n\
             [[prices]]\nmodel = \"llama-3.1-8b\"\nprompt_per_million = 0.15\ncompletion_per_million = \"0.6\"\n\
             [[prices]]\nmodel = \"*\"\nprompt_per_million = 3\ncompletion_per_million = 15\n\
             [pricing]\ncurrency = \"EUR\"\n\
             [usage]\nlisten = \"127.0.0.1:9466\"\nsecret_file = \"/etc/tollgate/usage.secret\"\n",
        ),
        "t.toml",
    )
    .unwrap();
    let q = c.plans[0].quota;
    assert_eq!(q.minute_tokens, Some(50_000));
    assert_eq!(q.day_money, Some(250_000_000));
    assert_eq!(q.month_money, Some(12_000_000_001));
    assert_eq!(c.prices.currency, "EUR");
    assert_eq!(
        c.prices.cost("llama-3.1-8b", 12, 40),
        Some(12 * 150 + 40 * 600)
    );
    assert_eq!(c.prices.cost("mixtral", 1, 1), Some(3_000 + 15_000));
    assert_eq!(c.usage.listen, Some("127.0.0.1:9466".parse().unwrap()));
    assert_eq!(c.usage.max_report_bytes, 4096);
    assert_eq!(c.usage.max_reports_per_s, 2000);
    let d = Config::parse(BASE, "t.toml").unwrap();
    assert!(!d.plans[0].quota.has_usage() && d.prices.rows.is_empty());
    assert_eq!(d.usage, crate::usage::UsageConfig::default());
}

#[test]
fn bad_token_money_and_usage_keys_are_refused_at_their_line() {
    let price = "[[prices]]\nmodel = \"m\"\nprompt_per_million = 1\ncompletion_per_million = 1\n";
    for (extra, line, field, fragment) in [
        (
            "tokens_per_minute = 0\n",
            6,
            "plans[0].tokens_per_minute",
            "between 1 and",
        ),
        (
            &format!("budget_per_minute = -1\n{price}")[..],
            6,
            "plans[0].budget_per_minute",
            "negative",
        ),
        (
            &format!("budget_per_minute = 0\n{price}")[..],
            6,
            "plans[0].budget_per_minute",
            "above 0",
        ),
        (
            &format!("budget_per_day = nan\n{price}")[..],
            6,
            "plans[0].budget_per_day",
            "not a decimal",
        ),
        (
            &format!("budget_per_day = inf\n{price}")[..],
            6,
            "plans[0].budget_per_day",
            "not a decimal",
        ),
        (
            &format!("budget_per_day = \"0.0000000001\"\n{price}")[..],
            6,
            "plans[0].budget_per_day",
            "9 decimal places",
        ),
        (
            &format!("budget_per_day = 2000000000\n{price}")[..],
            6,
            "plans[0].budget_per_day",
            "above the maximum",
        ),
        (
            "budget_per_month = 5\n",
            4,
            "plans[0]",
            "needs a price table",
        ),
        (
            "[[prices]]\nmodel = \"m\"\nprompt_per_million = -0.5\ncompletion_per_million = 1\n",
            8,
            "prices[0].prompt_per_million",
            "negative",
        ),
        (
            "[[prices]]\nmodel = \"m\"\nprompt_per_million = 0.0001\ncompletion_per_million = 1\n",
            8,
            "prices[0].prompt_per_million",
            "3 decimal places",
        ),
        (
            "[[prices]]\nmodel = \"m\"\nprompt_per_million = 1\ncompletion_per_million = 1e7\n",
            9,
            "prices[0].completion_per_million",
            "above the maximum",
        ),
        (
            &format!("{price}{price}")[..],
            11,
            "prices[1].model",
            "priced twice",
        ),
        (
            "[pricing]\ncurrency = \"U$D\"\n",
            7,
            "pricing.currency",
            "not a currency code",
        ),
        (
            "[usage]\nlisten = \"0.0.0.0:9466\"\nsecret_file = \"/s\"\n",
            7,
            "usage.listen",
            "not a loopback address",
        ),
        (
            "[usage]\nlisten = \"127.0.0.1:9466\"\n",
            6,
            "usage.secret_file",
            "needs a secret_file",
        ),
        (
            "[usage]\nsecret_file = \"relative\"\n",
            7,
            "usage.secret_file",
            "absolute path",
        ),
        (
            "[usage]\nmax_report_bytes = 10\n",
            7,
            "usage.max_report_bytes",
            "out of range",
        ),
    ] {
        assert_refused(&with(extra), line, field, fragment);
    }
    // Remote only when said so.
    let remote =
        with("[usage]\nlisten = \"0.0.0.0:9466\"\nsecret_file = \"/s\"\nallow_remote = true\n");
    assert!(Config::parse(&remote, "t.toml").unwrap().usage.allow_remote);
}
