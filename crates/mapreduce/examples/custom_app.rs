//! A program with a MapReduce app of its own, next to the built-ins: a histogram of line
//! lengths. It gets the whole command line (coordinator, worker, sequential, run):
//!
//! ```sh
//! cargo run --release -p sixfive-mapreduce --example custom_app -- \
//!     run --app linelen --workers 2 --out /tmp data/gutenberg/*.txt
//! ```

use std::process::ExitCode;

use clap::Parser;
use sixfive_mapreduce::app::{App, Registry};
use sixfive_mapreduce::cli::{MrCommand, main as mapreduce_main};

/// Lines per length bucket of 10 characters ("0040 1234": 1234 lines of 40-49 characters).
struct LineLengths;

impl App for LineLengths {
    fn map(&self, _file: &str, contents: &str, emit: &mut dyn FnMut(&str, &str)) -> Result<(), String> {
        for line in contents.lines() {
            emit(&format!("{:04}", line.chars().count() / 10 * 10), "1");
        }
        Ok(())
    }
    fn reduce(&self, _key: &str, values: &mut dyn Iterator<Item = String>) -> Result<String, String> {
        let mut sum = 0u64;
        for v in values {
            sum += v.parse::<u64>().map_err(|e| format!("bad count {v:?}: {e}"))?;
        }
        Ok(sum.to_string())
    }
    // Implementing the combiner is all it takes to have one.
    fn combine(&self, _key: &str, acc: &mut String, value: &str) -> bool {
        *acc = (acc.parse::<u64>().unwrap_or(0) + value.parse::<u64>().unwrap_or(0)).to_string();
        true
    }
}

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: MrCommand,
}

fn main() -> ExitCode {
    let mut apps = Registry::builtins();
    apps.register("linelen", |_| Ok(Box::new(LineLengths)));
    // No prefix: this program's subcommands are `coordinator`, `worker`, ... at the top level.
    mapreduce_main(Cli::parse().command, &apps, &[])
}
