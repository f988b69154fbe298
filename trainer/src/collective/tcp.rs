//! The CPU collective: a star over TCP. Every rank listens from the start;
//! the rendezvous id of an epoch is rank 0's listening address. In an
//! all-reduce every other rank sends its buffer to rank 0, which adds them in
//! rank order (so the sum is the same bits as a single process accumulating
//! the same parts in order) and sends the result back. Meant for machines
//! without GPUs (CI, laptops); NCCL is the path on GPUs.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

use super::{Collective, CollectiveError};

const BACKEND: &str = "tcp";
const MAGIC: &[u8; 8] = b"kvd-tcp1";
const POLL: Duration = Duration::from_millis(100);

fn transport(msg: impl Into<String>) -> CollectiveError {
    CollectiveError::Transport {
        backend: BACKEND,
        msg: msg.into(),
    }
}

/// The address other hosts reach this one at when it talks to `peer` (the
/// coordinator): the local side of a UDP socket "connected" to it.
pub fn local_ip_towards(peer: &str) -> std::net::IpAddr {
    let fallback = std::net::IpAddr::from([127, 0, 0, 1]);
    let Ok(sock) = UdpSocket::bind("0.0.0.0:0") else {
        return fallback;
    };
    if sock.connect(peer).is_err() {
        return fallback;
    }
    sock.local_addr().map_or(fallback, |a| a.ip())
}

/// A bound listener and the rendezvous id that names it.
pub struct TcpEndpoint {
    listener: TcpListener,
    id: Vec<u8>,
}

impl TcpEndpoint {
    /// Listens on `bind` (port 0: any) and advertises `advertise_ip`.
    pub fn bind(bind: &str, advertise_ip: std::net::IpAddr) -> Result<Self, CollectiveError> {
        let listener = TcpListener::bind(bind).map_err(|e| CollectiveError::Init {
            backend: BACKEND,
            msg: format!("cannot listen on {bind}: {e}"),
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| transport(e.to_string()))?
            .port();
        let addr = SocketAddr::new(advertise_ip, port).to_string();
        let mut id = format!("kvd-tcp:{addr}").into_bytes();
        id.resize(kvd_proto::NCCL_UNIQUE_ID_BYTES, 0);
        Ok(Self { listener, id })
    }

    /// The rendezvous id: this endpoint's address, padded to the NCCL id size.
    pub fn id(&self) -> &[u8] {
        &self.id
    }
}

fn parse_id(id: &[u8]) -> Result<String, CollectiveError> {
    let text = std::str::from_utf8(id)
        .ok()
        .map(|s| s.trim_end_matches('\0'))
        .and_then(|s| s.strip_prefix("kvd-tcp:"))
        .ok_or_else(|| CollectiveError::Init {
            backend: BACKEND,
            msg: "the rendezvous id is not a TCP collective address (is rank 0 using NCCL?)".into(),
        })?;
    Ok(text.to_string())
}

/// A TCP star of one membership epoch.
pub struct TcpStar {
    rank: usize,
    world: usize,
    /// Rank 0: the peers by rank (index 0 unused). Others: the link to rank 0.
    peers: Vec<Option<TcpStream>>,
    abort: Arc<AtomicBool>,
    timeout: Duration,
}

struct Io<'a> {
    abort: &'a AtomicBool,
    deadline: Instant,
    timeout: Duration,
}

impl Io<'_> {
    fn check(&self) -> Result<(), CollectiveError> {
        if self.abort.load(Ordering::SeqCst) {
            return Err(CollectiveError::Aborted { backend: BACKEND });
        }
        if Instant::now() > self.deadline {
            return Err(CollectiveError::Timeout {
                backend: BACKEND,
                seconds: self.timeout.as_secs(),
            });
        }
        Ok(())
    }

    fn read(&self, s: &mut TcpStream, buf: &mut [u8], peer: usize) -> Result<(), CollectiveError> {
        let mut off = 0;
        while off < buf.len() {
            self.check()?;
            match s.read(&mut buf[off..]) {
                Ok(0) => return Err(transport(format!("rank {peer} closed the connection"))),
                Ok(n) => off += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(transport(format!("reading from rank {peer}: {e}"))),
            }
        }
        Ok(())
    }

    fn write(&self, s: &mut TcpStream, buf: &[u8], peer: usize) -> Result<(), CollectiveError> {
        let mut off = 0;
        while off < buf.len() {
            self.check()?;
            match s.write(&buf[off..]) {
                Ok(0) => return Err(transport(format!("rank {peer} closed the connection"))),
                Ok(n) => off += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(transport(format!("writing to rank {peer}: {e}"))),
            }
        }
        Ok(())
    }
}

fn configure(s: &TcpStream) -> Result<(), CollectiveError> {
    s.set_nodelay(true)
        .and_then(|()| s.set_read_timeout(Some(POLL)))
        .and_then(|()| s.set_write_timeout(Some(POLL)))
        .map_err(|e| transport(e.to_string()))
}

fn hello(epoch: u64, rank: usize, world: usize) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&epoch.to_le_bytes());
    h.extend_from_slice(&(rank as u32).to_le_bytes());
    h.extend_from_slice(&(world as u32).to_le_bytes());
    h
}

impl TcpStar {
    /// Forms the star of `epoch`: rank 0 accepts the other ranks on
    /// `endpoint`, the others connect to the address in `id`. Gives up after
    /// `timeout` or when `abort` is set.
    pub fn connect(
        endpoint: &TcpEndpoint,
        id: &[u8],
        rank: usize,
        world: usize,
        epoch: u64,
        abort: Arc<AtomicBool>,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let io = Io {
            abort: &abort,
            deadline: Instant::now() + timeout,
            timeout,
        };
        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        if rank == 0 {
            endpoint
                .listener
                .set_nonblocking(true)
                .map_err(|e| transport(e.to_string()))?;
            let mut joined = 1;
            while joined < world {
                io.check()?;
                let (mut s, _) = match endpoint.listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(e) => return Err(transport(format!("accept: {e}"))),
                };
                s.set_nonblocking(false)
                    .map_err(|e| transport(e.to_string()))?;
                configure(&s)?;
                let mut h = [0u8; 24];
                if io.read(&mut s, &mut h, usize::MAX).is_err() || &h[..8] != MAGIC {
                    continue; // not one of ours, or gone: ignore
                }
                let e = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
                let r = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
                let w = u32::from_le_bytes(h[20..24].try_into().expect("4 bytes")) as usize;
                if e != epoch || w != world || r == 0 || r >= world || peers[r].is_some() {
                    tracing::debug!(epoch = e, rank = r, "ignoring a stale collective peer");
                    continue;
                }
                peers[r] = Some(s);
                joined += 1;
            }
        } else {
            let addr = parse_id(id)?;
            let mut s = loop {
                io.check()?;
                match TcpStream::connect(&addr) {
                    Ok(s) => break s,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            configure(&s)?;
            io.write(&mut s, &hello(epoch, rank, world), 0)?;
            peers[0] = Some(s);
        }
        Ok(Self {
            rank,
            world,
            peers,
            abort,
            timeout,
        })
    }
}

impl Collective for TcpStar {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut Tensor) -> Result<(), CollectiveError> {
        let io = Io {
            abort: &self.abort,
            deadline: Instant::now() + self.timeout,
            timeout: self.timeout,
        };
        let host = buf
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous();
        let mut acc: Vec<f32> =
            Vec::<f32>::try_from(&host).map_err(|e| transport(e.to_string()))?;
        let nbytes = acc.len() * 4;
        let mut bytes = vec![0u8; nbytes];
        if self.rank == 0 {
            for r in 1..self.world {
                let s = self.peers[r].as_mut().expect("rank 0 holds every peer");
                io.read(s, &mut bytes, r)?;
                for (a, c) in acc.iter_mut().zip(bytes.chunks_exact(4)) {
                    *a += f32::from_le_bytes(c.try_into().expect("4 bytes"));
                }
            }
            for (c, a) in bytes.chunks_exact_mut(4).zip(&acc) {
                c.copy_from_slice(&a.to_le_bytes());
            }
            for r in 1..self.world {
                let s = self.peers[r].as_mut().expect("rank 0 holds every peer");
                io.write(s, &bytes, r)?;
            }
        } else {
            for (c, a) in bytes.chunks_exact_mut(4).zip(&acc) {
                c.copy_from_slice(&a.to_le_bytes());
            }
            let s = self.peers[0].as_mut().expect("a link to rank 0");
            io.write(s, &bytes, 0)?;
            io.read(s, &mut bytes, 0)?;
            for (a, c) in acc.iter_mut().zip(bytes.chunks_exact(4)) {
                *a = f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
        }
        let summed = Tensor::from_slice(&acc).to_device(buf.device());
        buf.f_copy_(&summed).map_err(|e| transport(e.to_string()))?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        BACKEND
    }
}
