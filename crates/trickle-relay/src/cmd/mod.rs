//! One module per subcommand: each has an `Args` (clap) and an async `run`.

pub mod client;
pub mod demo;
pub mod publish;
pub mod runner;
pub mod serve;
pub mod subscribe;
