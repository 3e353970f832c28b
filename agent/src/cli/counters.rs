//! `tollgate counters`: the kernel's verdict counters, read straight from the pins.

use std::path::PathBuf;

use tollgate::{counter_read, paths, pins};
use tollgate_common::map_names;

use super::{Ctx, Outcome, exit, print};

/// The kernel's verdict counters read straight from the pins (works without the agent).
#[derive(clap::Args)]
pub struct CountersArgs {
    /// Pin directory.
    #[arg(long, value_name = "DIR", default_value = paths::PIN_DIR)]
    pin_dir: PathBuf,
}

pub fn run(a: CountersArgs, ctx: &Ctx) -> Outcome {
    let path = pins::maps_dir(&a.pin_dir).join(map_names::REASON_COUNTERS);
    match counter_read::reason_totals_from_pin(&path) {
        Ok(totals) => {
            let rows = counter_read::to_rows(&totals);
            ctx.print_with(|rows: &Vec<counter_read::ReasonTotal>| {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.reason.into(),
                            r.verdict.into(),
                            r.packets.to_string(),
                            r.bytes.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    print::table(&["reason", "verdict", "packets", "bytes"], &cells)
                );
            })(rows);
            Ok(())
        }
        Err(e) => super::fail(exit::NO_AGENT, e),
    }
}
