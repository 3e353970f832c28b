//! From the file's raw structures to a [`Config`]: every range, every reference between
//! sections, every contradiction the kernel could not hold (two endpoints on one port, one
//! prefix bound to two identities). The first refusal found stops the check.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::{Range, RangeInclusive},
    path::PathBuf,
};

use tollgate_common::policy::Class;

use super::{
    Config, ConfigError, Metrics,
    raw::{RawConfig, S},
};

mod controller;
mod fleet;
mod limits;
mod model_server;
mod node;
mod policy;
mod tokens;
mod usage;

type Result<T> = std::result::Result<T, ConfigError>;

/// Cost factors are Q8 in the kernel (u16): 1/256 is the smallest step above zero, and 255
/// keeps clear of the u16 ceiling.
const MIN_FACTOR: f64 = 1.0 / 256.0;
const MAX_FACTOR: f64 = 255.0;

pub(super) struct Checker<'a> {
    text: &'a str,
    source: &'a str,
    /// Role names in order of first appearance (bit i = 1 << i).
    roles: Vec<String>,
}

impl<'a> Checker<'a> {
    pub(super) fn new(text: &'a str, source: &'a str) -> Self {
        Checker {
            text,
            source,
            roles: Vec::new(),
        }
    }

    fn err(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.source.to_owned(),
            line: Some(super::line_of(self.text, span.start)),
            field: field.into(),
            message: message.into(),
        }
    }

    pub(super) fn config(mut self, raw: RawConfig) -> Result<Config> {
        let node = self.node(raw.node)?;
        let limits = self.limits(raw.limits)?;
        let anonymous = self.anonymous(raw.anonymous)?;
        let drop_events = self.drop_events(raw.drop_events)?;
        let controller = self.controller(raw.controller)?;
        let listen = self.listen(raw.listen)?;
        let plan_spans: Vec<Range<usize>> = raw
            .plans
            .as_ref()
            .map(|l| l.get_ref().iter().map(|p| p.span()).collect())
            .unwrap_or_default();
        let plans = self.plans(raw.plans, raw.fleet.is_some())?;
        let budget_plan = plans
            .iter()
            .position(|p| p.quota.has_money())
            .map(|i| (i.to_string(), plan_spans.get(i).cloned().unwrap_or(0..0)));
        let prices = self.prices(raw.prices, raw.pricing, budget_plan)?;
        let usage = self.usage(raw.usage)?;
        let endpoints = self.endpoints(raw.endpoints)?;
        let identities = self.identities(raw.identities, &plans, &limits.sizes)?;
        let identity_index = identities
            .iter()
            .enumerate()
            .map(|(i, id)| (id.name.clone(), i))
            .collect();
        let anomaly = self.anomaly(raw.anomaly)?;
        let raw_metrics = raw.metrics.unwrap_or_default();
        let metrics = Metrics {
            top_k: self.int(
                &raw_metrics.top_k,
                "metrics.top_k",
                Metrics::default().top_k as i64,
                0..=1000,
            )? as usize,
            identity_names: raw_metrics
                .identity_names
                .map_or(Metrics::default().identity_names, |b| *b.get_ref()),
        };
        let tokens = match raw.tokens {
            Some(t) => {
                let span = t.span();
                let tokens = self.tokens(t, &plans)?;
                self.bind_listener_coverage(span, &listen, &endpoints)?;
                Some(tokens)
            }
            None => None,
        };
        let fleet = raw.fleet.map(|f| self.fleet(f)).transpose()?;
        Ok(Config {
            source: self.source.to_owned(),
            node,
            anonymous,
            drop_events,
            controller,
            listen,
            plans,
            endpoints,
            identities,
            roles: self.roles,
            tokens,
            anomaly,
            metrics,
            fleet,
            limits,
            identity_index,
            prices,
            usage,
        })
    }

    /// The agent runs from systemd with an unspecified working directory: a relative path
    /// would land wherever that happens to be.
    fn abs_path(
        &self,
        v: &Option<S<String>>,
        field: &str,
        default: impl AsRef<std::path::Path>,
    ) -> Result<PathBuf> {
        let Some(v) = v else {
            return Ok(default.as_ref().to_owned());
        };
        let p = v.get_ref();
        if p.is_empty() || !p.starts_with('/') {
            return Err(self.err(
                v.span(),
                field,
                format!("{p:?} is not an absolute path (it must start with '/')"),
            ));
        }
        Ok(PathBuf::from(p))
    }

    fn socket_addr(
        &self,
        v: &Option<S<String>>,
        field: &str,
        default: SocketAddr,
    ) -> Result<SocketAddr> {
        let Some(v) = v else {
            return Ok(default);
        };
        let text = v.get_ref();
        let addr: SocketAddr = text.parse().map_err(|_| {
            self.err(
                v.span(),
                field,
                format!(
                    "{text:?} is not an address and port (e.g. \"0.0.0.0:8443\" or \
                     \"[::]:8443\")"
                ),
            )
        })?;
        if addr.port() == 0 {
            return Err(self.err(
                v.span(),
                field,
                format!("{text:?}: port 0 would listen on a random port"),
            ));
        }
        Ok(addr)
    }

    fn class(&self, v: &S<String>, field: &str) -> Result<Class> {
        match v.get_ref().as_str() {
            "internal" => Ok(Class::Internal),
            "partner" => Ok(Class::Partner),
            "customer" => Ok(Class::Customer),
            "anonymous" => Err(self.err(
                v.span(),
                field,
                "\"anonymous\" is not a class to name here: unbound sources are governed by \
                 [anonymous] and an endpoint's `anonymous = true`",
            )),
            other => Err(self.err(
                v.span(),
                field,
                format!("unknown class {other:?}: expected internal, partner or customer"),
            )),
        }
    }

    /// A name of 1..=`max` characters from a-z, 0-9, '_', '-' (and '.' when `dots`): names
    /// end up in metric labels, log lines and CLI arguments, where anything else needs quoting.
    fn name(&self, v: &S<String>, field: &str, max: usize, dots: bool) -> Result<String> {
        let name = v.get_ref();
        let ok_char = |c: char| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || c == '_'
                || c == '-'
                || (dots && c == '.')
        };
        if name.is_empty() || name.len() > max || !name.chars().all(ok_char) {
            let extra = if dots { ", '.'" } else { "" };
            return Err(self.err(
                v.span(),
                field,
                format!(
                    "{name:?} is not a valid name: use 1 to {max} characters of a-z, 0-9, '_', \
                     '-'{extra}"
                ),
            ));
        }
        Ok(name.clone())
    }

    /// A static identity's name: a name (dots allowed), or `<issuer>:<name>`, the name a
    /// token of issuer `<issuer>` has (its identities are namespaced by it) when the operator
    /// lets that issuer's tokens land on this identity.
    fn identity_name(&self, v: &S<String>, field: &str) -> Result<String> {
        let Some((issuer, rest)) = v.get_ref().split_once(':') else {
            return self.name(v, field, 64, true);
        };
        let part = |p: &str| S::new(v.span(), p.to_owned());
        self.name(
            &part(issuer),
            &format!("{field} (its issuer part)"),
            32,
            false,
        )?;
        self.name(&part(rest), field, 64, true)?;
        Ok(v.get_ref().clone())
    }

    /// An integer key with its default and allowed range.
    fn int(
        &self,
        v: &Option<S<i64>>,
        field: &str,
        default: i64,
        range: RangeInclusive<i64>,
    ) -> Result<i64> {
        let Some(v) = v else {
            return Ok(default);
        };
        let x = *v.get_ref();
        if range.contains(&x) {
            return Ok(x);
        }
        let message = if *range.end() == i64::MAX {
            format!("{x} is below the minimum of {}", range.start())
        } else {
            format!(
                "{x} is out of range: it must be between {} and {}",
                range.start(),
                range.end()
            )
        };
        Err(self.err(v.span(), field, message))
    }

    /// A Q8 cost factor (weight, pressure).
    fn factor(&self, v: &Option<S<f64>>, field: &str, default: f64) -> Result<f64> {
        let Some(v) = v else {
            return Ok(default);
        };
        let x = *v.get_ref();
        // Written so that NaN fails too.
        if !(MIN_FACTOR..=MAX_FACTOR).contains(&x) {
            return Err(self.err(
                v.span(),
                field,
                format!("{x} is out of range: it must be between 1/256 (0.00390625) and 255"),
            ));
        }
        Ok(x)
    }

    /// An address or a prefix (`198.18.0.0/15`, `2001:db8::/32`, a bare address for /32 or
    /// /128), refused when it has host bits set: the kernel would match the masked prefix, not
    /// what the operator wrote.
    fn prefix(&self, v: &S<String>, field: &str) -> Result<(IpAddr, u8)> {
        let text = v.get_ref();
        let bad = |m: String| self.err(v.span(), field, m);
        let (addr_text, len_text) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text.as_str(), None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| {
            bad(format!(
                "{text:?} is not an address or prefix (e.g. \"198.18.0.0/15\", \"2001:db8::/32\")"
            ))
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len_text {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max && !l.starts_with('+') => n,
                _ => {
                    return Err(bad(format!(
                        "{text:?}: prefix length {l:?} is not a number from 0 to {max}"
                    )));
                }
            },
        };
        let masked = mask(addr, len);
        if masked != addr {
            return Err(bad(format!(
                "{text} has host bits set (did you mean {masked}/{len}?)"
            )));
        }
        Ok((addr, len))
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}
