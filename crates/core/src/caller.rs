//! [`Caller`]: who a command is for. Its own module because both the commands
//! (`service.rs`) and the steps they arrange (`manager.rs`, which writes the request id into
//! audit records) name it, and neither should import the other for it.

use std::sync::Arc;

use crate::error::Error;

/// Most bytes of a caller context, as compact JSON.
pub const MAX_CONTEXT_BYTES: usize = 4096;

/// Most characters of a context's `run_id`.
pub const MAX_RUN_ID_CHARS: usize = 128;

/// Who is asking: the tenant its key belongs to, which key (an id, never the key), the
/// request's id (written into audit records, so that a client's request, a log line and a
/// record can be joined), and what the caller said about why (its context).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The tenant.
    pub tenant: String,
    /// The API key's id, when the door knows one.
    pub key_id: Option<String>,
    /// The request's id, when the door has one.
    pub request_id: Option<String>,
    /// The caller's context (the prompt, run, agent or step behind the call), when given.
    pub context: Option<Arc<CallerContext>>,
}

/// What an agent says about why it calls: a small JSON object (`prompt`, `run_id`, `agent`,
/// `step`, or anything else), kept in the audit records of what the call causes. Its
/// `run_id` (a string) finds a run's records and recognises retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerContext {
    value: serde_json::Map<String, serde_json::Value>,
    run_id: Option<String>,
}

impl CallerContext {
    /// Checks `value`: a JSON object of at most [`MAX_CONTEXT_BYTES`] bytes whose `run_id`,
    /// if present, is a non-empty string of at most [`MAX_RUN_ID_CHARS`] characters.
    pub fn new(value: serde_json::Value) -> Result<Self, Error> {
        let serde_json::Value::Object(map) = value else {
            return Err(Error::invalid("the context must be a JSON object"));
        };
        let size = serde_json::to_vec(&map).map_or(usize::MAX, |v| v.len());
        if size > MAX_CONTEXT_BYTES {
            return Err(Error::invalid(format!(
                "the context takes {size} bytes as JSON; at most {MAX_CONTEXT_BYTES} are kept"
            )));
        }
        let run_id = match map.get("run_id") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s))
                if !s.is_empty() && s.chars().count() <= MAX_RUN_ID_CHARS =>
            {
                Some(s.clone())
            }
            Some(_) => {
                return Err(Error::invalid(format!(
                    "the context's run_id must be a string of 1 to {MAX_RUN_ID_CHARS} characters"
                )));
            }
        };
        Ok(Self { value: map, run_id })
    }

    /// Parses the text of a header or field.
    pub fn parse(text: &str) -> Result<Self, Error> {
        if text.len() > MAX_CONTEXT_BYTES * 2 {
            return Err(Error::invalid(format!(
                "the context is longer than {MAX_CONTEXT_BYTES} bytes"
            )));
        }
        let value = serde_json::from_str(text)
            .map_err(|e| Error::invalid(format!("the context is not JSON: {e}")))?;
        Self::new(value)
    }

    /// The object.
    pub fn value(&self) -> serde_json::Value {
        serde_json::Value::Object(self.value.clone())
    }

    /// Its `run_id`.
    pub fn run_id(&self) -> Option<&str> {
        self.run_id.as_deref()
    }
}

impl Caller {
    /// A caller of `tenant`, with no key id, request id or context.
    pub fn new(tenant: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            key_id: None,
            request_id: None,
            context: None,
        }
    }

    /// The same caller with `context` (a body's, which overrides a header's), checked.
    pub fn with_context(
        mut self,
        context: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<Self, Error> {
        if let Some(map) = context {
            self.context = Some(Arc::new(CallerContext::new(serde_json::Value::Object(
                map,
            ))?));
        }
        Ok(self)
    }

    /// Writes who caused a record into it: request, key and context.
    pub(crate) fn stamp(&self, r: &mut ampoule_audit::Record) {
        r.request_id = self.request_id.clone();
        r.key_id = self.key_id.clone();
        if let Some(c) = &self.context {
            r.context = Some(c.value());
            r.run_id = c.run_id.clone();
        }
    }

    /// The same caller, for the request `id`.
    pub fn with_request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }
}
