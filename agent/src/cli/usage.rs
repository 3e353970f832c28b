//! `tollgate usage report`: one usage report over the control socket, as a gateway or a
//! sidecar sends it (for operators, scripts that relay a model server's `usage`, and tests).

use std::net::IpAddr;

use clap::Subcommand;
use tollgate::{
    control::protocol::Request,
    ops::usage::UsageAccepted,
    usage::{Usage, UsageReport, Who, money_text},
};

use super::{Ctx, Outcome, Output, print};

/// Report token usage (the usage feed; plans in tokens and money).
#[derive(clap::Args)]
pub struct UsageArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Count one request's prompt and completion tokens against an identity's plan.
    Report {
        /// The identity, by name.
        #[arg(long, group = "who", required_unless_present_any = ["token_id", "client"])]
        identity: Option<String>,
        /// The token id (jti) of a live token binding.
        #[arg(long, group = "who")]
        token_id: Option<String>,
        /// A client address: the identity its live binding names.
        #[arg(long, group = "who")]
        client: Option<IpAddr>,
        /// The model, as the price table names it.
        #[arg(long)]
        model: String,
        #[arg(long)]
        prompt: u64,
        #[arg(long)]
        completion: u64,
    },
}

pub fn run(a: UsageArgs, ctx: &Ctx) -> Outcome {
    match a.action {
        Action::Report {
            identity,
            token_id,
            client,
            model,
            prompt,
            completion,
        } => {
            let who = match (identity, token_id, client) {
                (Some(i), _, _) => Who::Identity(i),
                (_, Some(t), _) => Who::TokenId(t),
                (_, _, Some(c)) => Who::Client(c),
                // clap requires one of the three.
                _ => unreachable!("clap requires --identity, --token-id or --client"),
            };
            let req = Request::Usage(UsageReport {
                who,
                model,
                usage: Usage {
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    total_tokens: None,
                },
            });
            let output = ctx.output;
            super::call(&ctx.socket, &req, |r: UsageAccepted| match output {
                Output::Json => print::json(&r),
                Output::Text => print::done(&[
                    ("identity", Some(r.identity)),
                    ("plan", Some(r.plan)),
                    ("tokens", Some(r.tokens.to_string())),
                    ("cost", Some(money_text(r.money_nano))),
                    ("currency", Some(r.currency)),
                    ("minute_tokens", Some(r.minute_tokens.to_string())),
                    ("exhausted", r.exhausted),
                ]),
            })
        }
    }
}
