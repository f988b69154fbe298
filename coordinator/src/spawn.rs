//! `--spawn-local`: the workers as child processes of the coordinator, for
//! single-node jobs. Each child runs the worker command with `KVD_COORDINATOR`,
//! `KVD_RANK`, `KVD_LOCAL_RANK`, `KVD_TOKEN`, its share of the cores
//! (`OMP_NUM_THREADS`, `RAYON_NUM_THREADS`, `KVD_THREADS`, unless set) and,
//! when the machine has GPUs, `CUDA_VISIBLE_DEVICES` set to one GPU. A child that dies while the job runs
//! is started again with the same rank (what Kubernetes does for a pod); the
//! coordinator's heartbeat timeout handles the membership side.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};
use tracing::{info, warn};

/// GPUs visible to this machine: `KVD_LOCAL_GPUS` if set, else the lines of `nvidia-smi -L`.
pub fn visible_gpus() -> Vec<String> {
    if let Ok(n) = std::env::var("KVD_LOCAL_GPUS") {
        let n: usize = n.trim().parse().unwrap_or(0);
        return (0..n).map(|i| i.to_string()).collect();
    }
    if let Ok(list) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
    }
    std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("GPU "))
                .enumerate()
                .map(|(i, _)| i.to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The local workers.
pub struct LocalWorkers {
    command: Vec<String>,
    coordinator: String,
    token: String,
    gpus: Vec<String>,
    children: Vec<Option<Child>>,
    /// Restarts so far.
    pub restarts: u32,
}

impl LocalWorkers {
    /// Starts `n` copies of `command` talking to the coordinator at `addr`.
    /// (Over TLS the workers find the CA in `KVD_TLS_CA`, inherited.)
    pub fn start(
        command: &[String],
        n: u32,
        addr: SocketAddr,
        token: &str,
    ) -> anyhow::Result<Self> {
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        let gpus = visible_gpus();
        info!(workers = n, gpus = gpus.len(), command = ?command, "spawning local workers");
        let mut me = Self {
            command: command.to_vec(),
            coordinator: format!("{host}:{}", addr.port()),
            token: token.to_string(),
            gpus,
            children: (0..n).map(|_| None).collect(),
            restarts: 0,
        };
        for rank in 0..n as usize {
            me.spawn(rank)?;
        }
        Ok(me)
    }

    fn spawn(&mut self, rank: usize) -> anyhow::Result<()> {
        let (program, args) = self
            .command
            .split_first()
            .context("the worker command is empty")?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("KVD_COORDINATOR", &self.coordinator)
            .env("KVD_RANK", rank.to_string())
            .env("KVD_LOCAL_RANK", rank.to_string())
            .env("KVD_TOKEN", &self.token)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if !self.gpus.is_empty() {
            cmd.env("CUDA_VISIBLE_DEVICES", &self.gpus[rank % self.gpus.len()]);
        }
        die_with_parent(&mut cmd);
        // Share the cores: each worker's thread pools default to all of them,
        // and N oversubscribed workers launch GPU kernels late (measured: 2
        // workers on a 32-core host scale 85% -> 90% with 4 threads each).
        let share = (std::thread::available_parallelism().map_or(1, usize::from)
            / self.children.len().max(1))
        .clamp(1, 8)
        .to_string();
        for var in ["OMP_NUM_THREADS", "RAYON_NUM_THREADS", "KVD_THREADS"] {
            if std::env::var_os(var).is_none() {
                cmd.env(var, &share);
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the worker command {program:?}"))?;
        info!(rank, pid = child.id(), "worker started");
        self.children[rank] = Some(child);
        Ok(())
    }

    /// Restarts children that died while the job runs; forgets ones that
    /// exited cleanly. Returns how many are still running.
    pub fn supervise(&mut self, job_over: bool) -> anyhow::Result<usize> {
        let mut running = 0;
        for rank in 0..self.children.len() {
            let Some(child) = self.children[rank].as_mut() else {
                continue;
            };
            match child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(status)) => {
                    self.children[rank] = None;
                    if status.success() || job_over {
                        info!(rank, %status, "worker exited");
                    } else {
                        warn!(rank, %status, "worker died: starting it again");
                        self.restarts += 1;
                        self.spawn(rank)?;
                        running += 1;
                    }
                }
                Err(e) => warn!(rank, error = %e, "cannot poll a worker"),
            }
        }
        Ok(running)
    }

    /// Waits up to `grace` for the children to exit, then kills the rest.
    pub async fn shutdown(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match self.supervise(true) {
                Ok(0) | Err(_) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        for (rank, child) in self.children.iter_mut().enumerate() {
            if let Some(c) = child.as_mut() {
                warn!(rank, "worker still running after the job ended: killing it");
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
            *child = None;
        }
    }
}

/// Makes the worker die with this process (Linux: the parent-death signal),
/// so a coordinator killed with SIGKILL leaves no orphaned workers holding
/// GPUs and memory. Spawns happen on the thread that runs the coordinator's
/// loop, which lives as long as the process.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (prctl, getppid).
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the signal was armed.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the coordinator exited"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}
