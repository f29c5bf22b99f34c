//! FILE (POSIX) and OBJ (S3 via moto) transfers (needs the NIXL runtime and the moto venv).
#![allow(clippy::unwrap_used, reason = "test code")]
#![cfg(feature = "nixl-runtime-tests")]

use std::time::Duration;

use nixl_core::{
    Agent, AgentConfig, BackendKind, BackendParams, FileRegion, HostBuffer, MemType, ObjectRegion,
    XferDescs, XferOp,
};
use nixl_testkit::{S3Server, pattern, tempdir, unique_name};

fn run(agent: &Agent, op: XferOp, local: &XferDescs, storage: &XferDescs) {
    let req = agent
        .create_request(op, local, storage, agent.name(), None)
        .unwrap();
    req.post().unwrap();
    req.wait(Duration::from_secs(60), std::thread::yield_now)
        .unwrap();
}

#[test]
fn posix_write_then_read_back_at_an_offset() {
    let dir = tempdir().unwrap();
    let path = dir.path().join("page.bin");
    let agent = Agent::new(&unique_name("posix"), &AgentConfig::default()).unwrap();
    agent
        .create_backend(BackendKind::Posix, &BackendParams::new())
        .unwrap();
    let len = 256 * 1024u64;
    let file = FileRegion::open(&path, true).unwrap();
    file.file().set_len(4096 + len).unwrap();
    let file = agent.register(file).unwrap();
    let mut src = agent
        .register(HostBuffer::new(len as usize).unwrap())
        .unwrap();
    let dst = agent
        .register(HostBuffer::new(len as usize).unwrap())
        .unwrap();
    pattern::fill(src.buffer_mut().as_mut_slice(), 11);

    let fd = file.buffer().fd();
    let mut storage = XferDescs::new(MemType::File);
    storage.push(4096, len, fd);
    let mut host = XferDescs::new(MemType::Dram);
    host.push_in(&src.region(), 0, len);
    run(&agent, XferOp::Write, &host, &storage);

    // The bytes are really in the file, at the offset.
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk[..4096].iter().all(|&b| b == 0));
    assert_eq!(pattern::verify(&on_disk[4096..], 11), Ok(()));

    let mut back = XferDescs::new(MemType::Dram);
    back.push_in(&dst.region(), 0, len);
    run(&agent, XferOp::Read, &back, &storage);
    assert_eq!(pattern::verify(dst.buffer().as_slice(), 11), Ok(()));
}

#[test]
fn obj_put_and_get_against_a_local_s3_server() {
    let s3 = S3Server::start("nixl-core-test").unwrap();
    let agent = Agent::new(&unique_name("obj"), &AgentConfig::default()).unwrap();
    agent
        .create_backend(BackendKind::Obj, &s3.obj_params())
        .unwrap();
    let len = 1 << 20;
    let object = agent.register(ObjectRegion::new(7)).unwrap();
    let mut src = agent.register(HostBuffer::new(len).unwrap()).unwrap();
    let dst = agent.register(HostBuffer::new(len).unwrap()).unwrap();
    pattern::fill(src.buffer_mut().as_mut_slice(), 12);

    let mut storage = XferDescs::new(MemType::Object);
    storage.push(0, len as u64, object.buffer().id());
    let mut host = XferDescs::new(MemType::Dram);
    host.push_in(&src.region(), 0, len as u64);
    run(&agent, XferOp::Write, &host, &storage);

    let mut back = XferDescs::new(MemType::Dram);
    back.push_in(&dst.region(), 0, len as u64);
    run(&agent, XferOp::Read, &back, &storage);
    assert_eq!(pattern::verify(dst.buffer().as_slice(), 12), Ok(()));
}

#[test]
fn file_descriptor_past_the_end_of_an_unregistered_file_fails_cleanly() {
    let agent = Agent::new(&unique_name("posix-err"), &AgentConfig::default()).unwrap();
    agent
        .create_backend(BackendKind::Posix, &BackendParams::new())
        .unwrap();
    let src = agent.register(HostBuffer::new(4096).unwrap()).unwrap();
    let mut storage = XferDescs::new(MemType::File);
    storage.push(0, 4096, 987_654); // no such registered fd
    let mut host = XferDescs::new(MemType::Dram);
    host.push_in(&src.region(), 0, 4096);
    let err = agent
        .create_request(XferOp::Write, &host, &storage, agent.name(), None)
        .unwrap_err();
    assert!(matches!(err, nixl_core::Error::Nixl { .. }), "{err}");
}
