//! `tollgate endpoints`.

use tollgate::control::{
    protocol::Request,
    reply::{EndpointRow, Endpoints},
};

use super::{
    Ctx, Outcome,
    print::{float, list, proto, table},
};

/// Protected endpoints with their packet counts.
#[derive(clap::Args)]
pub struct EndpointsArgs {}

pub fn run(_: EndpointsArgs, ctx: &Ctx) -> Outcome {
    super::call(
        &ctx.socket,
        &Request::Endpoints {},
        ctx.print_with(|rows: &Endpoints| print!("{}", text(rows))),
    )
}

fn text(rows: &[EndpointRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|e| {
            let classes: Vec<&str> = e.classes.iter().map(|c| c.label()).collect();
            vec![
                e.id.to_string(),
                e.name.clone(),
                proto(e.protocol).into(),
                list(&e.ports),
                float(e.weight),
                list(&classes),
                list(&e.roles),
                e.anonymous.to_string(),
                e.passed_packets.to_string(),
                e.dropped_packets.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "id",
            "name",
            "protocol",
            "ports",
            "weight",
            "classes",
            "roles",
            "anonymous",
            "packets_passed",
            "packets_dropped",
        ],
        &cells,
    )
}

#[cfg(test)]
mod tests {
    use tollgate::tables::Proto;
    use tollgate_common::policy::Class;

    use super::*;

    #[test]
    fn text_is_the_documented_table() {
        let rows = vec![
            EndpointRow {
                id: 1,
                name: "model".into(),
                protocol: Proto::Tcp,
                ports: vec!["8000".into(), "8001-8003".into()],
                weight: 1.0,
                classes: vec![Class::Internal, Class::Partner],
                roles: vec![],
                anonymous: false,
                passed_packets: 9120301,
                dropped_packets: 18244,
            },
            EndpointRow {
                id: 2,
                name: "bind".into(),
                protocol: Proto::Tcp,
                ports: vec!["8443".into()],
                weight: 1.0,
                classes: vec![Class::Internal, Class::Partner],
                roles: vec![],
                anonymous: true,
                passed_packets: 32,
                dropped_packets: 0,
            },
        ];
        let wire = serde_json::to_string(&rows).unwrap();
        let read: Endpoints = serde_json::from_str(&wire).unwrap();
        assert_eq!(
            text(&read),
            "ID  NAME   PROTOCOL  PORTS           WEIGHT  CLASSES           ROLES  ANONYMOUS  PACKETS_PASSED  PACKETS_DROPPED
1   model  tcp       8000,8001-8003  1.0     internal,partner  -      false      9120301         18244
2   bind   tcp       8443            1.0     internal,partner  -      true       32              0
"
        );
    }
}
