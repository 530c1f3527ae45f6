//! The bench harness behind `trickle-relay bench <path>`: one module per measured path.
//!
//! A library, so that the `trickle-relay` binary stays the CLI: it hands `bench`'s arguments to
//! [`run`]. `bench relay` and `bench sessions` start their server, runners and clients as
//! separate processes by running this same program again (`trickle-relay bench relay-runner` /
//! `relay-client`, `sessions-runners` / `sessions-clients`, hidden subcommands), so the binary
//! that calls [`run`] must route those too, which it does by passing every `bench` subcommand
//! here.
//!
//! Every benchmark prints a human summary (or JSON with `--json`) of the same shape:
//! what ran, the counts, and each latency or throughput figure as median and spread; and with
//! `--plot FILE` draws its latency distribution and its throughput over time as a two-panel SVG.
//! [`report`] holds what they share (arguments, recordings, printer), [`plot`] draws the SVG.

mod fanout;
mod fanout_copy;
mod http_egress;
mod kafka;
mod plot;
mod publish_event;
mod relay;
mod relay_child;
mod report;
mod sessions;
mod sessions_child;
mod spool;

use clap::Subcommand;

/// Arguments of `trickle-relay bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(Subcommand, Debug)]
enum Which {
    /// Trickle server fan-out: one publisher, many subscribers of one large segment.
    Fanout(fanout::Args),
    /// The kernel's copy path for fan-out (issue #17): vectored writes from user memory against
    /// `sendfile` from a memory file, one sender thread to many loopback sockets.
    FanoutCopy(fanout_copy::Args),
    /// Cost of one `publish_event` call, single-threaded and contended.
    PublishEvent(publish_event::Args),
    /// Accepted events per second through the durable disk buffer.
    Spool(spool::Args),
    /// The HTTP metrics reporter: accepted events/s into its disk buffer, and through to a collector.
    HttpEgress(http_egress::Args),
    /// Throughput into a Kafka broker: the Kafka sink (disk and memory buffer) and the
    /// collector's Kafka output.
    Kafka(kafka::Args),
    /// The relay path end to end: server, runner and client as separate processes.
    Relay(relay::Args),
    /// Many concurrent sessions on one trickle server: the server's memory, CPU, connections and
    /// latency against the number of sessions.
    Sessions(sessions::Args),
    /// Child of `bench sessions`: every session's runner role, in one process.
    #[command(hide = true)]
    SessionsRunners(sessions_child::RunnersArgs),
    /// Child of `bench sessions`: every session's client role, in one process.
    #[command(hide = true)]
    SessionsClients(sessions_child::ClientsArgs),
    /// Child of `bench relay`: the runner role, emitting synthetic heartbeats.
    #[command(hide = true)]
    RelayRunner(relay_child::RunnerArgs),
    /// Child of `bench relay`: the client role, counting what it egresses.
    #[command(hide = true)]
    RelayClient(relay_child::ClientArgs),
}

/// Runs the chosen benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.which {
        Which::Fanout(a) => fanout::run(a).await,
        Which::FanoutCopy(a) => fanout_copy::run(a).await,
        Which::PublishEvent(a) => publish_event::run(a).await,
        Which::Spool(a) => spool::run(a).await,
        Which::HttpEgress(a) => http_egress::run(a).await,
        Which::Kafka(a) => kafka::run(a).await,
        Which::Relay(a) => relay::run(a).await,
        Which::Sessions(a) => sessions::run(a).await,
        Which::SessionsRunners(a) => sessions_child::run_runners(a).await,
        Which::SessionsClients(a) => sessions_child::run_clients(a).await,
        Which::RelayRunner(a) => relay_child::run_runner(a).await,
        Which::RelayClient(a) => relay_child::run_client(a).await,
    }
}
