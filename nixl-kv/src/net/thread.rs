//! One IO thread with its own current-thread tokio runtime: the ZeroMQ thread, the PULL
//! listener and the bootstrap server each run on one.

use std::future::Future;
use std::thread::JoinHandle;

/// Spawns thread `name` running `task` to completion on a current-thread runtime with IO and
/// time enabled. When the runtime cannot be built, `failed` gets why and `task` never runs.
pub(crate) fn spawn<F, Fut>(
    name: &str,
    failed: impl FnOnce(std::io::Error) + Send + 'static,
    task: F,
) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(task()),
                Err(e) => failed(e),
            }
        })
}
