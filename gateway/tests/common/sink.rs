//! A CloudEvents sink for the delivery tests: a small HTTP/1.1 server on a loopback
//! port whose behaviour the test switches (503, a stall past any client timeout, or
//! 200), and which records every request it read.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const DOWN: u8 = 0;
pub const STALL: u8 = 1;
pub const UP: u8 = 2;

/// One request the sink saw, and what it answered (`None`: stalled, no answer).
#[derive(Debug, Clone)]
pub struct Seen {
    pub content_type: String,
    pub body: Vec<u8>,
    pub answered: Option<u16>,
}

/// A CloudEvents sink on a loopback port, its behaviour switched by the test.
pub struct TestSink {
    pub url: String,
    mode: Arc<AtomicU8>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl TestSink {
    pub fn start() -> TestSink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/events", listener.local_addr().expect("addr"));
        let mode = Arc::new(AtomicU8::new(DOWN));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (m, s) = (mode.clone(), seen.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (m, s) = (m.clone(), s.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                    let (mut len, mut ctype) = (0usize, String::new());
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        let lower = l.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if let Some(v) = lower.strip_prefix("content-type:") {
                            ctype = v.trim().to_string();
                        }
                    }
                    let mut body = vec![0; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let mut conn = conn;
                    let answered = match m.load(Ordering::SeqCst) {
                        DOWN => Some(503),
                        STALL => None,
                        _ => Some(200),
                    };
                    s.lock().expect("lock").push(Seen {
                        content_type: ctype,
                        body,
                        answered,
                    });
                    match answered {
                        Some(code) => {
                            let _ = write!(
                                conn,
                                "HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            );
                        }
                        // Past any client timeout of this test.
                        None => std::thread::sleep(Duration::from_secs(5)),
                    }
                });
            }
        });
        TestSink { url, mode, seen }
    }

    pub fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}
