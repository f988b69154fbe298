//! What the test-server wrappers (moto, fake-gcs-server, Azurite) share: a
//! free local port, and waiting until the started process listens on it.

use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::{Result, ServerError};

/// A port free on 127.0.0.1 right now.
pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| ServerError::config(format!("no free port: {e}")))?
        .port())
}

/// Waits until `name` (the process `child`) accepts connections on `port`;
/// an error when it exits first (with `detail()` appended, if not empty) or
/// after `timeout`.
pub(crate) fn wait_listening(
    name: &str,
    child: &mut Child,
    port: u16,
    timeout: Duration,
    detail: impl Fn() -> String,
) -> Result<()> {
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > timeout {
            return Err(ServerError::config(format!(
                "{name} did not answer within {} s",
                timeout.as_secs()
            )));
        }
        if let Ok(Some(st)) = child.try_wait() {
            let d = detail();
            return Err(ServerError::config(if d.is_empty() {
                format!("{name} exited: {st}")
            } else {
                format!("{name} exited: {st}: {d}")
            }));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
