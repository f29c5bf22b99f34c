//! Agent metadata: the opaque blob peers exchange to reach each other.

/// An agent's serialized metadata (name, backend connection info, registered regions and their
/// remote keys), as produced by NIXL. Opaque: pass it to the peer's [`crate::Agent::load_remote`].
#[derive(Clone, PartialEq, Eq)]
pub struct AgentMetadata(Vec<u8>);

impl AgentMetadata {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Takes the bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl From<Vec<u8>> for AgentMetadata {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

impl AsRef<[u8]> for AgentMetadata {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for AgentMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentMetadata({} bytes)", self.0.len())
    }
}
