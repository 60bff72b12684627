//! [`Caller`]: who a command is for. Its own module because both the commands
//! (`service.rs`) and the steps they arrange (`manager.rs`, which writes the request id into
//! audit records) name it, and neither should import the other for it.

/// Who is asking: the tenant its key belongs to, which key (an id, never the key), and the
/// request's id (written into audit records, so that a client's request, a log line and a
/// record can be joined).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The tenant.
    pub tenant: String,
    /// The API key's id, when the door knows one.
    pub key_id: Option<String>,
    /// The request's id, when the door has one.
    pub request_id: Option<String>,
}

impl Caller {
    /// A caller of `tenant`, with no key id and no request id.
    pub fn new(tenant: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            key_id: None,
            request_id: None,
        }
    }

    /// The same caller, for the request `id`.
    pub fn with_request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }
}
