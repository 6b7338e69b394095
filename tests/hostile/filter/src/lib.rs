//! A hostile plugin for the sandbox tests. The record's text picks the attack; any other
//! record is kept, so a test can check that neighbours of a bad record survive. A record that
//! contains `hostile-hang` anywhere spins forever.

use ftx_plugin_api::filter::{export_filter, Filter, Item, Verdict};
use std::hint::black_box;

struct Hostile;

fn recurse(n: u64) -> u64 {
    if n == 0 { 0 } else { black_box(recurse(n - 1)) + black_box(1) }
}

impl Filter for Hostile {
    fn filter(items: Vec<Item>) -> Vec<Verdict> {
        let mut verdicts: Vec<Verdict> = items.iter().map(|i| attack(&i.json)).collect();
        // A batch holding a record that mentions "short-verdicts" gets one verdict too few (a record alone gets its one).
        if items.len() > 1 && items.iter().any(|i| i.json.contains("short-verdicts")) {
            verdicts.pop();
        }
        verdicts
    }
}

fn attack(json: &str) -> Verdict {
    // Inside any record (a whole prepared record, say), this one hangs.
    if json.contains("hostile-hang") {
        loop {
            black_box(0);
        }
    }
    match json.trim_matches('"') {
        "loop" => loop {
            black_box(0);
        },
        "alloc" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 8 << 20]);
                black_box(&hoard);
            }
        }
        "recurse" => Verdict::Drop(format!("depth {}", recurse(black_box(u64::MAX)))),
        "read-file" => Verdict::Drop(format!("file: {:?}", std::fs::read_to_string("/etc/passwd").map(|s| s.len()))),
        "env" => Verdict::Drop(format!("env: {} vars, HOME={:?}", std::env::vars().count(), std::env::var("HOME").ok())),
        "socket" => Verdict::Drop(format!("socket: {:?}", std::net::TcpStream::connect("127.0.0.1:80").map(|_| "connected"))),
        "clock" => Verdict::Drop(format!("clock: {:?}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()))),
        "huge" => Verdict::Rewrite(format!("\"{}\"", "x".repeat(8 << 20))),
        "panic" => panic!("the hostile plugin panics on purpose"),
        // A reason of 100,000 bytes that starts by turning the terminal red.
        s if s.contains("long-reason") => Verdict::Drop(format!("\x1b[31m{}", "r".repeat(100_000 - 5))),
        _ => Verdict::Keep,
    }
}

export_filter!(Hostile);
