//! `bts-guru-bench`: load generator for Pusher-protocol WebSocket servers. See
//! `bts_guru::bench` and `bts-guru-bench --help`.

use clap::Parser;

fn main() {
    let args = bts_guru::bench::Args::parse();
    std::process::exit(bts_guru::bench::main(args));
}
