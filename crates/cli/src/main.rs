//! The `sagamesh` binary: parses the command line, starts tracing, and hands
//! over to the mesh or the bench. Only this crate reads the environment.

mod bench;
mod cli;
mod machine;
mod watch;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

// Every event allocates small buffers on one thread and frees them on
// another. With mimalloc a purchase costs 7% fewer instructions than with
// glibc's allocator (callgrind, docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tasks a busy worker runs between looks at the network and the timers
/// (tokio's default is 61). The services of one process talk through
/// channels, not sockets, so under load most of those looks found little;
/// looking less often reads more at a time. At concurrency 64: `epoll_wait`
/// calls per purchase 1.63 -> 1.20, `recvfrom` 1.26 -> 1.07, and about 5%
/// more purchases a second (docs/PERFORMANCE.md). An idle worker still
/// waits on the network at once. A bench driving another process's mesh
/// does everything over sockets; with tokio's default it was no faster
/// (four alternating pairs at concurrency 64: 3,064-3,712/s against
/// 3,370-3,809/s with this), so it keeps this too.
const EVENT_INTERVAL: u32 = 200;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // The bench prints its own report; a mesh it starts logs only problems.
    let default_level = if cli.is_bench() { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal, plain text for log files.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // A bench that drives a mesh in another process is a load generator
    // sharing the machine with what it measures: one thread does its work
    // with a fifth of the context switches and a quarter less CPU than two
    // workers handing tasks to each other (docs/PERFORMANCE.md).
    let mut builder = if cli.is_remote_bench() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.event_interval(EVENT_INTERVAL).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sagamesh: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("sagamesh: {e}");
            ExitCode::FAILURE
        }
    }
}
