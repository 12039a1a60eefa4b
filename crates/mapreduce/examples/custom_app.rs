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
    fn map(&self, _file: &str, contents: &str, emit: &mut dyn FnMut(&str, &str)) {
        for line in contents.lines() {
            emit(&format!("{:04}", line.chars().count() / 10 * 10), "1");
        }
    }
    fn reduce(&self, _key: &str, values: &[String]) -> Result<String, String> {
        Ok(values.iter().map(|v| v.parse::<u64>().unwrap_or(0)).sum::<u64>().to_string())
    }
    fn combine(&self, _key: &str, acc: &mut String, value: &str) -> bool {
        *acc = (acc.parse::<u64>().unwrap_or(0) + value.parse::<u64>().unwrap_or(0)).to_string();
        true
    }
    fn has_combiner(&self) -> bool {
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
