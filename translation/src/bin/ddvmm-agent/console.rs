//! Console lines the agent writes while it should be serving: handed to a thread of their own,
//! so that a channel thread does not wait for the serial port (every byte is a VM exit; after a
//! restore, the first requests are waiting while these lines are written).

use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};

static LINES: OnceLock<Mutex<Sender<String>>> = OnceLock::new();

/// Prints `line` on the console from the console thread (at once if it cannot be started).
pub fn say(line: String) {
    let tx = LINES.get_or_init(|| {
        let (tx, rx) = channel::<String>();
        let started = std::thread::Builder::new()
            .name("agent-console".into())
            .spawn(move || {
                for l in rx {
                    println!("{l}");
                }
            });
        if let Err(e) = started {
            eprintln!("ddvmm-agent: console thread: {e}");
        }
        Mutex::new(tx)
    });
    let sent = tx
        .lock()
        .map(|t| t.send(line.clone()).is_ok())
        .unwrap_or(false);
    if !sent {
        println!("{line}");
    }
}
