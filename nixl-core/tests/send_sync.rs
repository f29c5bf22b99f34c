//! The documented `Send`/`Sync` contract, checked at compile time.
#![allow(clippy::unwrap_used, reason = "test code")]

use nixl_core::{
    Agent, AgentMetadata, Backend, Error, FileRegion, HostBuffer, Notification, ObjectRegion,
    PreparedDescs, Registered, Registration, XferDescs, XferRequest,
};

fn send_sync<T: Send + Sync>() {}

#[test]
fn public_handles_are_send_and_sync() {
    send_sync::<Agent>();
    send_sync::<Backend>();
    send_sync::<XferRequest>();
    send_sync::<PreparedDescs>();
    send_sync::<Registration>();
    send_sync::<Registered<HostBuffer>>();
    send_sync::<Registered<FileRegion>>();
    send_sync::<Registered<ObjectRegion>>();
    send_sync::<HostBuffer>();
    send_sync::<XferDescs>();
    send_sync::<AgentMetadata>();
    send_sync::<Notification>();
    send_sync::<Error>();
}
