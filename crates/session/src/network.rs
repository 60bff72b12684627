//! Sessions with network access: the kernel's sandbox wired to an egress gateway.
//!
//! [`Session::start_with`] spawns the sandbox in allowlist mode
//! ([`Network::Allowlist`], root only) and starts its gateway
//! ([`ampoule_egress::Gateway`]) in the runtime's prepare hook, so the gateway listens before
//! the kernel can open a connection. The gateway belongs to the [`Session`]: it stops when the
//! session is closed or dropped, after the sandbox.
//!
//! Attribution: each execution's result carries the decisions the gateway made while it ran
//! (`ExecutionResult::egress`). Decisions made between executions (by a thread the code left
//! running) are logged when they happen and belong to no result. A caller that knows its own
//! ids names them with [`Gateway::set_context`] (through [`Session::egress`]) so every logged
//! decision carries them.

use std::sync::Arc;

use ampoule_egress::{Egress, Endpoints, Gateway, Policy};
use ampoule_runtime::scratch::CODE;
use ampoule_runtime::{Host, Network, Prepare, Sandbox, SandboxConfig};
use ampoule_types::{EgressEvent, Limits};

use crate::error::Result;
use crate::language::LanguageSpec;
use crate::session::{Session, sandbox_config};

/// How to start a session beyond its language and limits.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SessionOptions {
    /// Network access through the egress gateway; `None`: loopback only.
    pub network: Option<SessionNetwork>,
    /// A disk image holding the session's files (`/mnt/data`, `/tmp`) instead of memory, so
    /// that they outlive it (see `ampoule_runtime::disk`); made by the caller. Root only.
    pub disk: Option<std::path::PathBuf>,
    /// gVisor tier, no network: a checkpoint image (see [`Session::checkpoint`]) the sandbox
    /// is restored from, its kernel's memory with it, instead of starting a fresh kernel.
    pub restore: Option<std::path::PathBuf>,
}

impl SessionOptions {
    /// Options with network access under `policy`, served by `egress`.
    pub fn with_network(egress: Egress, policy: Arc<Policy>) -> Self {
        Self {
            network: Some(SessionNetwork { egress, policy }),
            disk: None,
            restore: None,
        }
    }

    /// These options restoring the session from the checkpoint image at `path`.
    pub fn with_restore(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.restore = Some(path.into());
        self
    }

    /// These options with the session's files on the disk image at `path`.
    pub fn with_disk(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.disk = Some(path.into());
        self
    }
}

/// A session's network: the process's egress service and the session's policy.
#[derive(Debug, Clone)]
pub struct SessionNetwork {
    /// The egress service (resolver pins, CA, upstream trust), one per process.
    pub egress: Egress,
    /// What the session may reach.
    pub policy: Arc<Policy>,
}

impl SessionNetwork {
    /// Puts the sandbox of a session with this network in allowlist mode, trusting the
    /// gateway's CA when the policy injects credentials, with the policy's environment (a pool
    /// with a package index points `pip` at it: `PIP_INDEX_URL`). The same for a cold sandbox
    /// and a zygote's child.
    pub(crate) fn configure(&self, cfg: &mut SandboxConfig) {
        cfg.network = Network::Allowlist {
            trusted_ca_pem: self.egress.trusted_ca_pem(&self.policy),
        };
        for (key, value) in self.policy.sandbox_env() {
            match cfg.env.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None => cfg.env.push((key, value)),
            }
        }
    }

    /// Starts the session's gateway on the link the runtime made (its `prepare` hook).
    pub(crate) fn start_gateway(&self, p: &Prepare<'_>) -> ampoule_runtime::Result<Gateway> {
        let addrs = p.network.ok_or_else(|| {
            ampoule_runtime::Error::Network("the sandbox has no link to a gateway".into())
        })?;
        self.egress
            .start(
                Endpoints {
                    proxy: addrs.proxy(),
                    dns: addrs.dns(),
                    peer: Some(addrs.sandbox.into()),
                },
                self.policy.clone(),
                &addrs.interface,
            )
            .map_err(|e| ampoule_runtime::Error::Network(format!("egress gateway: {e}")))
    }
}

impl Session {
    /// [`Session::start`] with options: with `options.network`, the sandbox is wired to its
    /// own egress gateway and to nothing else. When the policy injects credentials the sandbox
    /// trusts the gateway's CA (`SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `NODE_EXTRA_CA_CERTS`…
    /// point at it, set by the runtime); the secrets stay in this process.
    pub async fn start_with(
        host: &Host,
        spec: LanguageSpec,
        limits: Limits,
        options: SessionOptions,
    ) -> Result<Self> {
        let Some(net) = options.network else {
            let mut cfg = sandbox_config(&spec, &limits);
            cfg.disk = options.disk;
            cfg.restore_image = options.restore;
            return Self::start_config(host, spec, limits, cfg).await;
        };
        if options.restore.is_some() {
            return Err(ampoule_runtime::Error::Invalid(
                "a session with network cannot be restored from a checkpoint".into(),
            )
            .into());
        }
        let mut cfg = sandbox_config(&spec, &limits);
        cfg.disk = options.disk;
        net.configure(&mut cfg);
        let files = spec.files.clone();
        let mut gateway = None;
        let sandbox = Sandbox::spawn_with(host, &cfg, |p| {
            // Listening before the hook returns: the kernel starts after it.
            gateway = Some(net.start_gateway(&p)?);
            for f in &files {
                p.scratch
                    .write(CODE, f.name, f.contents.as_bytes(), 0o644)?;
            }
            Ok(())
        })
        .await?;
        let mut session = Self::handshake(sandbox, spec.language, limits).await?;
        session.gateway = gateway;
        Ok(session)
    }

    /// The session's egress gateway, when it has network.
    pub fn egress(&self) -> Option<&Gateway> {
        self.gateway.as_ref()
    }

    /// The gateway's decisions since the last call (empty without network). Executions take
    /// their own into `ExecutionResult::egress`; this is for what happens outside them.
    pub fn take_egress_events(&self) -> Vec<EgressEvent> {
        self.gateway
            .as_ref()
            .map(Gateway::take_events)
            .unwrap_or_default()
    }
}
