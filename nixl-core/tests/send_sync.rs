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
    send_sync::<nixl_core::SharedHostBuffer>();
    send_sync::<Registered<nixl_core::SharedHostBuffer>>();
    send_sync::<XferDescs>();
    send_sync::<AgentMetadata>();
    send_sync::<Notification>();
    send_sync::<Error>();
}

#[cfg(feature = "cuda")]
#[test]
fn device_buffers_are_send_sync_and_fail_cleanly_without_a_driver() {
    send_sync::<nixl_core::cuda::DeviceBuffer>();
    match nixl_core::cuda::DeviceBuffer::new(0, 4096) {
        Ok(b) => assert!(nixl_core::cuda::driver_present() && b.len() == 4096),
        Err(e) => {
            assert!(matches!(e, Error::Cuda { .. }), "{e}");
            // On a machine without a GPU the reason says so instead of panicking.
            if !nixl_core::cuda::driver_present() {
                assert!(e.to_string().contains("libcuda"), "{e}");
            }
        }
    }
}
