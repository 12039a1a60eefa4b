//! The job's web page: `mr coordinator --http ADDR` serves a static HTML page (`/`) that
//! polls a JSON endpoint (`/status.json`): the job's state, its phases, tasks, workers, and
//! a timeline of every task attempt per worker. Plain HTTP/1.1 over std's TCP; one request
//! per connection; nothing but GET of those two paths is served.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::coordinator::{Coordinator, Span};
use crate::proto::JobStatus;

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_opt<T>(v: &Option<T>, f: impl Fn(&T) -> String) -> String {
    v.as_ref().map(f).unwrap_or_else(|| "null".into())
}

/// The job's state as one JSON object (`mr status -w json`, and the page's data).
pub fn status_json(s: &JobStatus) -> String {
    let workers: Vec<String> = s
        .worker_list
        .iter()
        .map(|w| {
            format!(
                "{{\"id\":\"{:016x}\",\"addr\":{},\"last_heard_ms\":{},\"tasks_done\":{},\"running\":{}}}",
                w.id,
                json_str(&w.addr),
                w.last_heard_ms,
                w.tasks_done,
                json_opt(&w.running, |r| json_str(r))
            )
        })
        .collect();
    format!(
        "{{\"done\":{},\"failed\":{},\"maps\":{},\"maps_done\":{},\"maps_running\":{},\"reduces\":{},\
         \"reduces_done\":{},\"reduces_running\":{},\"bytes_total\":{},\"bytes_in\":{},\
         \"bytes_intermediate\":{},\"bytes_out\":{},\"elapsed_ms\":{},\"eta_ms\":{},\"reexecuted\":{},\
         \"backups\":{},\"resumed_tasks\":{},\"workers\":[{}]}}",
        s.done,
        json_opt(&s.failed, |f| json_str(f)),
        s.maps,
        s.maps_done,
        s.maps_running,
        s.reduces,
        s.reduces_done,
        s.reduces_running,
        s.bytes_total,
        s.bytes_in,
        s.bytes_intermediate,
        s.bytes_out,
        s.elapsed_ms,
        json_opt(&s.eta_ms, |v| v.to_string()),
        s.reexecuted,
        s.backups,
        s.resumed_tasks,
        workers.join(",")
    )
}

/// Status plus the timeline: `{"status": {...}, "timeline": [...]}`.
pub fn page_json(s: &JobStatus, spans: &[Span]) -> String {
    let spans: Vec<String> = spans
        .iter()
        .map(|p| {
            format!(
                "{{\"kind\":\"{}\",\"task\":{},\"worker\":\"{:016x}\",\"start_ms\":{},\"end_ms\":{},\"outcome\":\"{}\"}}",
                if p.map { "map" } else { "reduce" },
                p.task,
                p.worker,
                p.start_ms,
                json_opt(&p.end_ms, |v| v.to_string()),
                p.outcome
            )
        })
        .collect();
    format!("{{\"status\":{},\"timeline\":[{}]}}", status_json(s), spans.join(","))
}

/// The page: static, with its script inline; it fetches `/status.json` every half second.
pub const PAGE: &str = include_str!("job.html");

/// Serves the page and its JSON on `listener` for as long as the process lives.
pub fn serve_http(listener: TcpListener, state: Arc<Mutex<Coordinator>>, start: Instant) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let state = state.clone();
        std::thread::spawn(move || {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut line = String::new();
            let mut r = BufReader::new(match conn.try_clone() {
                Ok(c) => c,
                Err(_) => return,
            });
            if r.read_line(&mut line).is_err() {
                return;
            }
            // Read (and ignore) the headers.
            let mut h = String::new();
            while r.read_line(&mut h).is_ok_and(|n| n > 2) {
                h.clear();
            }
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (code, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
                ("GET", "/") | ("GET", "/index.html") => ("200 OK", "text/html; charset=utf-8", PAGE.to_string()),
                ("GET", "/status.json") => {
                    let c = state.lock().expect("coordinator state");
                    let now = start.elapsed();
                    ("200 OK", "application/json", page_json(&c.status_at(now), c.spans()))
                }
                ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
                _ => ("405 Method Not Allowed", "text/plain", "only GET\n".to_string()),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
}
