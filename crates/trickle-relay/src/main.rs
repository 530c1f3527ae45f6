//! `trickle-relay`: relay live-video runner telemetry over trickle.
//!
//! One binary, one subcommand per role: the trickle server, the trickle command-line client
//! (`subscribe`, `publish`), the runner and client relay roles, the collector, an all-in-one
//! `demo`, and the benchmarks (`bench`, the `bench` crate). Each command's module in [`cmd`] reads
//! its flags and calls the library crates.

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Relay live-video runner telemetry over trickle, losslessly.
///
/// Start with `trickle-relay demo`: it runs a trickle server, a runner and a client in one
/// program and prints what happened to every event.
#[derive(Parser, Debug)]
#[command(name = "trickle-relay", version, about, long_about)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info`, `debug`, `trickle=trace`.
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    log: String,
    /// Log lines on stderr as `text`, or `json` (one object per line, for log shippers).
    #[arg(long, global = true, env = logging::FORMAT_ENV, value_enum, default_value_t)]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the embedded demo: server, runner and client in one program, with a summary.
    Demo(cmd::demo::Args),
    /// Run a trickle server.
    Serve(cmd::serve::Args),
    /// Print a trickle channel to stdout (the curl of trickle).
    Subscribe(cmd::subscribe::Args),
    /// Publish stdin to a trickle channel.
    Publish(cmd::publish::Args),
    /// Run the runner role: answer the control channel, write telemetry to the events channel.
    Runner(cmd::runner::Args),
    /// Run the client role: read the events channel and egress telemetry.
    Client(cmd::client::Args),
    /// Run the `/v1/metrics` collector: authenticate, validate, dedup and durably store metrics batches.
    Collector(cmd::collector::Args),
    /// Run a benchmark of one path of the relay.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr (so that `subscribe` can own stdout) and to the process's log tail
    // (served by `client --http`, forwarded to the client by `runner`).
    let tail = relay::logtail::LogTail::global().layer();
    logging::init(&cli.log, cli.log_format, Some(tail));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            logging::console_error(format_args!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Demo(a) => cmd::demo::run(a).await,
            Command::Serve(a) => cmd::serve::run(a).await,
            Command::Subscribe(a) => cmd::subscribe::run(a).await,
            Command::Publish(a) => cmd::publish::run(a).await,
            Command::Runner(a) => cmd::runner::run(a).await,
            Command::Client(a) => cmd::client::run(a).await,
            Command::Collector(a) => cmd::collector::run(a).await,
            Command::Bench(a) => bench::run(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::console_error(format_args!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}
