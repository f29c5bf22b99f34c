//! Everything that touches a socket: our bounded ZMTP (the prefill's PULL listener, the
//! decode's PUSH connections), SGLang's bootstrap HTTP server and its client, the accept gate and
//! rate-limited logs they share, the IO threads they run on, and busy polling.
//!
//! Nothing here decides anything about rooms or pages: that is [`crate::proto`]. The driver
//! (the private `driver` module) wires these to the cores.

pub mod bootstrap;
pub(crate) mod busy;
pub(crate) mod gate;
pub(crate) mod thread;
pub mod zmtp;
