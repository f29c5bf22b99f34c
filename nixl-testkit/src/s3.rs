//! A local S3 server (moto) for the NIXL OBJ backend.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixl_core::BackendParams;

use crate::{Error, Result};

/// The environment variable naming the moto venv (default: `target/moto-venv`, found from the
/// test executable's or the current directory's ancestors; `cargo xtask prereq` creates it).
pub const MOTO_VENV_ENV: &str = "NIXL_TESTKIT_MOTO_VENV";

/// Credentials moto accepts.
const KEY: &str = "testing";

/// A moto S3 server on 127.0.0.1 with one bucket; killed on drop.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    port: u16,
    bucket: String,
}

impl S3Server {
    /// Starts the server on a free port and creates `bucket`.
    pub fn start(bucket: &str) -> Result<Self> {
        let venv = find_venv()?;
        let port = free_port()?;
        let child = Command::new(venv.join("bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::Setup(format!("starting moto_server: {e}")))?;
        let server = Self {
            child,
            port,
            bucket: bucket.to_owned(),
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                return Err(Error::Timeout(format!(
                    "moto_server did not listen on {port}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // boto3 comes with moto[server]; let it speak S3 rather than hand-writing requests.
        let script = format!(
            "import boto3; boto3.client('s3', endpoint_url='{}', aws_access_key_id='{KEY}', \
             aws_secret_access_key='{KEY}', region_name='us-east-1').create_bucket(Bucket='{bucket}')",
            server.endpoint_url()
        );
        let status = Command::new(venv.join("bin/python"))
            .args(["-c", &script])
            .status()
            .map_err(|e| Error::Setup(format!("creating bucket: {e}")))?;
        if !status.success() {
            return Err(Error::Setup(format!(
                "creating bucket {bucket} failed: {status}"
            )));
        }
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// OBJ backend parameters for this server (path-style addressing, test credentials).
    pub fn obj_params(&self) -> BackendParams {
        BackendParams::new()
            .with("endpoint_override", format!("127.0.0.1:{}", self.port))
            .with("scheme", "http")
            .with("bucket", self.bucket.clone())
            .with("region", "us-east-1")
            .with("use_virtual_addressing", "false")
            .with("access_key", KEY)
            .with("secret_key", KEY)
            .with("req_checksum", "required")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Setup(format!("bind: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::Setup(format!("local_addr: {e}")))
}

fn find_venv() -> Result<PathBuf> {
    if let Some(v) = std::env::var_os(MOTO_VENV_ENV) {
        return Ok(v.into());
    }
    let starts: Vec<PathBuf> = [std::env::current_exe().ok(), std::env::current_dir().ok()]
        .into_iter()
        .flatten()
        .collect();
    for s in &starts {
        for anc in s.ancestors() {
            for rel in ["moto-venv", "target/moto-venv"] {
                let v = anc.join(rel);
                if is_venv(&v) {
                    return Ok(v);
                }
            }
        }
    }
    Err(Error::Setup(format!(
        "no moto venv found; run `cargo xtask prereq` or set {MOTO_VENV_ENV}"
    )))
}

fn is_venv(v: &Path) -> bool {
    v.join("bin/moto_server").is_file()
}
