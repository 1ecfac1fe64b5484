//! Clients that keep sending requests through Envoy, each on one keep-alive connection,
//! while a test changes the config: that is how users see a change go wrong. Each client
//! speaks plain HTTP/1.1 over its own socket, so a connection is reused for as long as
//! Envoy keeps it open (a draining listener closes it after a response that says
//! `connection: close`, and the client opens a new one).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

/// What the clients saw, summed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Responses received.
    pub responses: u64,
    /// By HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// By the value of the watched header (`-` when absent).
    pub by_header: BTreeMap<String, u64>,
    /// Connections opened (the first per client included).
    pub connections: u64,
    /// A request sent on a connection that closed before any response came back.
    pub closed_unanswered: u64,
    /// The first few non-200 responses, status and body, for the failure message.
    pub samples: Vec<String>,
}

impl Tally {
    /// Responses whose status was not 200.
    pub fn not_ok(&self) -> u64 {
        self.by_status.iter().filter(|(s, _)| **s != 200).map(|(_, n)| n).sum()
    }

    /// Responses without the watched header.
    pub fn without_header(&self) -> u64 {
        self.by_header.get("-").copied().unwrap_or(0)
    }

    fn add(&mut self, other: &Tally) {
        self.responses += other.responses;
        for (k, v) in &other.by_status {
            *self.by_status.entry(*k).or_default() += v;
        }
        for (k, v) in &other.by_header {
            *self.by_header.entry(k.clone()).or_default() += v;
        }
        self.connections += other.connections;
        self.closed_unanswered += other.closed_unanswered;
        for s in &other.samples {
            if self.samples.len() < 5 {
                self.samples.push(s.clone());
            }
        }
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} responses, {} not 200 {:?}, header {:?}, {} connections, {} closed unanswered",
            self.responses,
            self.not_ok(),
            self.by_status,
            self.by_header,
            self.connections,
            self.closed_unanswered
        )?;
        if !self.samples.is_empty() {
            write!(f, "; first non-200: {:?}", self.samples)?;
        }
        Ok(())
    }
}

/// Running clients. Dropping it stops them.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    tallies: Vec<Arc<Mutex<Tally>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    /// `clients` clients sending `GET path` to `127.0.0.1:port` back to back, counting the
    /// value of `header` in each response.
    pub fn start(port: u16, clients: usize, path: &str, header: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tallies = Vec::new();
        let mut threads = Vec::new();
        for i in 0..clients {
            let tally = Arc::new(Mutex::new(Tally::default()));
            tallies.push(tally.clone());
            let (stop, path, header) = (stop.clone(), path.to_owned(), header.to_ascii_lowercase());
            let t = std::thread::Builder::new()
                .name(format!("traffic-{i}"))
                .spawn(move || client(port, &path, &header, &stop, &tally))
                .expect("spawn a traffic client");
            threads.push(t);
        }
        Traffic { stop, tallies, threads }
    }

    /// What the clients saw since the last `take`, and start counting afresh.
    pub fn take(&self) -> Tally {
        let mut sum = Tally::default();
        for t in &self.tallies {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            sum.add(&t);
            *t = Tally::default();
        }
        sum
    }

    /// Waits (at most `within`) until `n` responses since the last `take` carried the
    /// watched header with `value`: traffic seen on the new config, not a fixed pause.
    pub fn wait_for_header(&self, value: &str, n: u64, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let seen: u64 = self
                .tallies
                .iter()
                .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).by_header.get(value).copied().unwrap_or(0))
                .sum();
            if seen >= n {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{n} responses with {value}: {seen} in {within:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the clients and returns what they saw since the last `take`.
    pub fn stop(mut self) -> Tally {
        self.halt();
        self.take()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One client: a connection reused until the server closes it.
fn client(port: u16, path: &str, header: &str, stop: &AtomicBool, tally: &Mutex<Tally>) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: traffic\r\nuser-agent: filterplane-e2e\r\n\r\n");
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) {
        let reader = match conn.as_mut() {
            Some(r) => r,
            None => match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = s.set_nodelay(true);
                    tally.lock().unwrap_or_else(|p| p.into_inner()).connections += 1;
                    conn.insert(BufReader::new(s))
                }
                Err(_) => {
                    // Nothing listening (yet): the listener is not there, which the test's
                    // own checks will show. Do not spin.
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            },
        };
        if reader.get_mut().write_all(request.as_bytes()).is_err() {
            tally.lock().unwrap_or_else(|p| p.into_inner()).closed_unanswered += 1;
            conn = None;
            continue;
        }
        match read_response(reader, header) {
            Ok(r) => {
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                t.responses += 1;
                *t.by_status.entry(r.status).or_default() += 1;
                *t.by_header.entry(r.header.unwrap_or_else(|| "-".into())).or_default() += 1;
                if r.status != 200 && t.samples.len() < 5 {
                    t.samples.push(format!("{} {}", r.status, r.body.trim()));
                }
                if r.close {
                    conn = None;
                }
            }
            Err(_) => {
                tally.lock().unwrap_or_else(|p| p.into_inner()).closed_unanswered += 1;
                conn = None;
            }
        }
    }
}

struct Response {
    status: u16,
    header: Option<String>,
    close: bool,
    body: String,
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

fn read_response(r: &mut BufReader<TcpStream>, watched: &str) -> std::io::Result<Response> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(bad("closed"));
    }
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad("status line"))?;
    let (mut length, mut chunked, mut close, mut header) = (0usize, false, false, None);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("closed in headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((k, v)) = l.split_once(':') else { continue };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "content-length" => length = v.parse().map_err(|_| bad("content-length"))?,
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            "connection" => close = v.eq_ignore_ascii_case("close"),
            _ => {}
        }
        if k == watched {
            header = Some(v.to_owned());
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16).map_err(|_| bad("chunk size"))?;
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        body.resize(length, 0);
        r.read_exact(&mut body)?;
    }
    Ok(Response { status, header, close, body: String::from_utf8_lossy(&body).into_owned() })
}
