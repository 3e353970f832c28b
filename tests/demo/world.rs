//! The demo's world: who is who, the plans, and the lab (namespaces, the agent's directories,
//! token material, the simulated GPU file) with the configuration the agent runs on.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    sync::atomic::Ordering,
};

use tollgate_tests::{
    agent::{AgentDirs, tollgate_bin},
    config::{self, Config, Controller, Endpoint, Identity, Tokens},
    lab::{Lab, NetNs, SecondClient},
    tokenlab::{AUDIENCE, BIND_PORT, MODEL_PORT, TokenKit},
};

use crate::{FINISHED, interrupted};

// The demo configuration.
pub const INTERVAL_MS: u32 = 250;
pub const SATURATE_AT: f64 = 0.9;
pub const RECOVER_AT: f64 = 0.75;
pub const RECOVER_AFTER: u32 = 4;
pub const FLOOR: f64 = 0.1;
pub const GPU_CALM: f64 = 0.2;
pub const GPU_HOT: f64 = 0.97;
pub const ANON_PPS: u32 = 20;
pub const ANON_BURST: u32 = 40;
pub const METRICS: &str = "127.0.0.1:9464";
/// Endpoint ids: position in the configuration, from 1.
pub const EP_MODEL: u32 = 1;
pub const EP_BIND: u32 = 2;

/// A plan of the demo configuration.
pub struct Plan {
    pub name: &'static str,
    pub priority: u32,
    pub pps: u32,
    pub burst: u32,
}

pub const PLANS: [Plan; 3] = [
    Plan {
        name: "internal",
        priority: 100,
        pps: 2000,
        burst: 500,
    },
    Plan {
        name: "partner",
        priority: 80,
        pps: 460,
        burst: 200,
    },
    Plan {
        name: "customer",
        priority: 40,
        pps: 460,
        burst: 200,
    },
];

/// Share of its budget a plan keeps while its endpoint is saturated (docs/controller.md).
pub fn share(priority: u32) -> f64 {
    FLOOR + (1.0 - FLOOR) * f64::from(priority) / 100.0
}

/// Who is who; the index into every per-client array.
pub const WHO: [&str; 4] = ["internal", "partner", "customer", "attacker"];
pub const INTERNAL: usize = 0;
pub const PARTNER: usize = 1;
pub const CUSTOMER: usize = 2;
pub const ATTACKER: usize = 3;
/// Identity names: a static one, and two that exist because their tokens name them.
pub const IDENTITY: [&str; 3] = ["internal-batch", "partner-acme", "customer-alice"];

pub const PHASES: [&str; 3] = ["normal", "saturated", "recovered"];

/// Everything that makes up the lab. Fields drop in declaration order: the pins and state
/// first (unlinking the pins detaches the program), the namespaces last. The agent, the model
/// server and the traffic are locals of `run` declared after the world, so they stop first.
pub struct World {
    pub dirs: AgentDirs,
    pub kit: TokenKit,
    pub gpu_file: std::path::PathBuf,
    pub clients: [SecondClient; 3],
    pub lab: Lab,
}

/// Ends every loop when dropped: on the way out of `run`, whichever way it leaves.
pub struct StopLoops;

impl Drop for StopLoops {
    fn drop(&mut self) {
        FINISHED.store(true, Ordering::SeqCst);
    }
}

impl World {
    pub fn client_ns(&self, who: usize) -> &NetNs {
        match who {
            CUSTOMER => &self.lab.client,
            INTERNAL => &self.clients[0].ns,
            PARTNER => &self.clients[1].ns,
            _ => &self.clients[2].ns,
        }
    }

    pub fn client_v4(&self, who: usize) -> Ipv4Addr {
        match who {
            CUSTOMER => self.lab.client_v4,
            INTERNAL => self.clients[0].client_v4,
            PARTNER => self.clients[1].client_v4,
            _ => self.clients[2].client_v4,
        }
    }

    pub fn model_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.lab.server_v4), MODEL_PORT)
    }

    pub fn gpu(&self, util: f64) -> anyhow::Result<()> {
        let out = Command::new(tollgate_bin())
            .args(["gpu", "simulate", "--util", &util.to_string(), "--file"])
            .arg(&self.gpu_file)
            .stdin(Stdio::null())
            .output()?;
        anyhow::ensure!(
            out.status.success() || interrupted(),
            "tollgate gpu simulate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    pub fn interfaces(&self) -> Vec<&str> {
        let mut v = vec![self.lab.server_if.as_str()];
        v.extend(self.clients.iter().map(|c| c.server_if.as_str()));
        v
    }

    /// The demo configuration, through the typed builder.
    pub fn write_config(&self) -> anyhow::Result<std::path::PathBuf> {
        let internal_net = {
            let o = self.clients[0].client_v4.octets();
            Ipv4Addr::new(o[0], o[1], o[2], 0)
        };
        let classes = ["internal", "partner", "customer"];
        let mut config = Config::new(&self.interfaces())
            .anonymous(ANON_PPS.into(), ANON_BURST.into())
            .drop_events(1000)
            .controller(Controller {
                interval_ms: Some(INTERVAL_MS.into()),
                saturate_at: Some(SATURATE_AT),
                recover_at: Some(RECOVER_AT),
                recover_after: Some(RECOVER_AFTER),
                hold_back_floor: Some(FLOOR),
                ..Controller::simulated(&self.gpu_file)
            })
            .listen_bind(SocketAddr::new(IpAddr::V4(self.lab.server_v4), BIND_PORT))
            .listen_metrics(METRICS)
            .tokens(Tokens {
                jwks: self.kit.jwks.clone(),
                audience: AUDIENCE.into(),
                tls_cert: self.kit.ca.clone(),
                tls_key: self.kit.tls_key.clone(),
                max_ttl_s: Some(3600),
                default_class: Some("customer".into()),
                default_plan: Some("customer".into()),
                ..Tokens::default()
            });
        config.node.xdp_mode = Some("native".into());
        for p in &PLANS {
            config = config.plan(
                config::Plan::new(p.name)
                    .priority(p.priority as u8)
                    .packets(p.pps.into(), p.burst.into()),
            );
        }
        let path = config
            .endpoint(Endpoint::tcp("model", MODEL_PORT, &classes).gpus(&[0]))
            .endpoint(Endpoint::tcp("bind", BIND_PORT, &classes).anonymous())
            .identity(Identity::new(
                IDENTITY[INTERNAL],
                "internal",
                "internal",
                &[format!("{internal_net}/24")],
            ))
            .write(&self.dirs.state_dir.join("tollgate-demo.toml"));
        Ok(path)
    }
}
