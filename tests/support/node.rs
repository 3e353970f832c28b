//! The agent-test world: a lab, the agent's directories, and a policy with four plans, four
//! endpoints and six identities (`config`), with helpers to send one real frame and read the
//! reason the kernel counted it under, and to ask the agent's CLI (`explain`, `identities`).
//! tests/agent.rs and tests/cli.rs run on it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use tollgate_common::packet::PacketBuilder;

use crate::{
    agent::{Agent, AgentDirs},
    config::{Config, Endpoint, Identity, Plan, Port},
    frames::send_frames,
    lab::Lab,
};

/// A host in the client's /24 (and /64).
pub fn host4(lab: &Lab, n: u8) -> IpAddr {
    let o = lab.client_v4.octets();
    IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], n))
}

pub fn host6(lab: &Lab, n: u16) -> IpAddr {
    let s = lab.client_v6.segments();
    IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, n))
}

/// Plans internal (unlimited), customer, metered and slow; endpoints vllm (TCP 8000), admin
/// (TCP 9000, internal only), grpc (UDP 8001-8002, weight 2) and bind (TCP 8443, anonymous);
/// identities ops (.10), acme (.11), partnerco (.64/26), slowpoke (.12), suspect (.13) and
/// metered (.14), the first two also on IPv6.
pub fn config(lab: &Lab) -> Config {
    let (h, h6) = (|n| host4(lab, n), |n| host6(lab, n));
    let o = lab.client_v4.octets();
    let partner_range = Ipv4Addr::new(o[0], o[1], o[2], 64);
    Config::new(&[&lab.server_if])
        .anonymous(1, 3)
        .plan(Plan::new("internal"))
        .plan(Plan::new("customer").packets(1000, 1000))
        .plan(Plan::new("metered").packets(200, 20))
        .plan(Plan::new("slow").packets(1, 2))
        .endpoint(
            Endpoint::tcp("vllm", 8000, &["internal", "partner", "customer"]).roles(&["inference"]),
        )
        .endpoint(Endpoint::tcp("admin", 9000, &["internal"]))
        .endpoint(
            Endpoint::new(
                "grpc",
                "udp",
                vec![Port::range(8001, 8002)],
                &["internal", "customer"],
            )
            .roles(&["inference"])
            .weight(2.0),
        )
        .endpoint(Endpoint::tcp("bind", 8443, &["customer"]).anonymous())
        .identity(
            Identity::new("ops", "internal", "internal", &[h(10), h6(10)])
                .roles(&["inference", "admin"]),
        )
        .identity(
            Identity::new("acme", "customer", "customer", &[h(11), h6(11)]).roles(&["inference"]),
        )
        .identity(Identity::new(
            "partnerco",
            "partner",
            "customer",
            &[format!("{partner_range}/26")],
        ))
        .identity(Identity::new("slowpoke", "customer", "slow", &[h(12)]).roles(&["inference"]))
        .identity(Identity::new("suspect", "customer", "customer", &[h(13)]).roles(&["inference"]))
        .identity(Identity::new("metered", "customer", "metered", &[h(14)]).roles(&["inference"]))
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

/// The lab, the agent's directories and its config file.
pub struct World {
    pub lab: Lab,
    pub dirs: AgentDirs,
    pub config: PathBuf,
}

impl World {
    pub fn new() -> World {
        crate::require_root();
        let lab = Lab::new();
        let dirs = AgentDirs::new();
        let config = config(&lab).write(&dirs.state_dir.join("tollgate.toml"));
        World { lab, dirs, config }
    }

    pub fn start(&self) -> Agent {
        let config = self.config.to_str().expect("utf-8 path");
        Agent::launch(
            &self.lab.server,
            &self.dirs,
            &["--config", config, "--mode", "native"],
        )
    }

    pub fn dst(&self, src: IpAddr) -> IpAddr {
        if src.is_ipv4() {
            IpAddr::V4(self.lab.server_v4)
        } else {
            IpAddr::V6(self.lab.server_v6)
        }
    }

    /// Packets per reason, from the pins.
    pub fn reasons(&self) -> BTreeMap<&'static str, u64> {
        tollgate::counter_read::reason_totals_from_pin(&self.dirs.counters_pin())
            .expect("counters")
            .into_iter()
            .map(|(r, c)| (r.label(), c.packets))
            .collect()
    }

    /// Sends one real frame and returns the reason the kernel counted it under.
    pub fn real_verdict(&self, src: IpAddr, port: u16, proto: &str) -> &'static str {
        let before = self.reasons();
        send_frames(
            &self.lab.client,
            &self.lab.client_if,
            &[frame(src, self.dst(src), port, proto)],
        );
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let after = self.reasons();
            let moved: Vec<(&'static str, u64)> = after
                .iter()
                .filter(|&(r, n)| *n != before[r])
                .map(|(r, n)| (*r, n - before[r]))
                .collect();
            if !moved.is_empty() {
                assert_eq!(
                    moved.len(),
                    1,
                    "one frame moved several counters: {moved:?}"
                );
                assert_eq!(moved[0].1, 1, "one frame counted {moved:?}");
                return moved[0].0;
            }
            assert!(
                Instant::now() < deadline,
                "the frame from {src} never reached XDP"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `tollgate explain` as JSON: (verdict, reason).
    pub fn explain(&self, src: IpAddr, port: u16, proto: &str) -> (String, String) {
        let dst = match self.dst(src) {
            IpAddr::V4(a) => format!("{a}:{port}/{proto}"),
            IpAddr::V6(a) => format!("[{a}]:{port}/{proto}"),
        };
        let out = self
            .dirs
            .cli_ok(&["explain", &src.to_string(), &dst, "--output", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("explain json");
        (
            v["verdict"].as_str().unwrap_or_default().to_owned(),
            v["reason"].as_str().unwrap_or_default().to_owned(),
        )
    }

    pub fn identity(&self, name: &str) -> serde_json::Value {
        let out = self
            .dirs
            .cli_ok(&["identities", "show", name, "--output", "json"]);
        serde_json::from_str(&out).expect("identity json")
    }
}

pub fn frame(src: IpAddr, dst: IpAddr, port: u16, proto: &str) -> Vec<u8> {
    let b = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::v4(s.octets(), d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::v6(s.octets(), d.octets()),
        _ => panic!("mixed families"),
    };
    match proto {
        "tcp" => b.tcp(40000, port),
        _ => b.udp(40000, port),
    }
    .payload(60)
    .build()
}
