//! `sigil-agent run`: establishes the agent's identity, then runs the entry
//! sync, the SVID manager, the agent SVID renewal and the Workload API until
//! SIGINT or SIGTERM, or until one of them fails for good.
//!
//! `<data_dir>/ready` is written once the Workload API socket accepts
//! connections and the first sync message has been applied, and removed at
//! exit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sigil::SpiffeId;
use sigil::tls::{SvidResolver, TrustStore};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::cache::SnapshotReceiver;
use crate::client::{self, AgentChannel};
use crate::config::Config;
use crate::manager::{GrpcSigner, Manager, SystemClock};
use crate::node::{self, NodeIdentity, Reattestation, Renewer, Storage};
use crate::sync::EntrySync;
use crate::workload;

/// The file that tells the agent is serving.
pub(crate) const READY_FILE: &str = "ready";

/// How long the Workload API gets to stop after the shutdown signal.
const SERVE_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the agent until a signal (`Ok`) or a fatal error.
pub(crate) async fn run(config: Config) -> anyhow::Result<()> {
    let storage = Storage::new(&config.data_dir);
    storage.create()?;
    let ready = config.data_dir.join(READY_FILE);
    remove_file_if_present(&ready)
        .with_context(|| format!("cannot remove the stale {}", ready.display()))?;

    let identity = node::establish(&config, &storage).await?;
    let mut agent = Agent::start(&config, storage, identity)?;

    // Bound now, the socket accepts connections (they wait in its backlog)
    // before the server task runs, so readiness needs no probing.
    let listener = workload::bind(&config.socket_path)
        .with_context(|| "cannot serve the Workload API".to_owned())?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let shutdown = async move {
        let mut rx = stop_rx;
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let socket_path = config.socket_path.clone();
    let snapshots = agent.snapshots.clone();
    let attestor = Arc::new(
        workload::Attestor::new(&config.workload_attestors)
            .context("cannot set up the k8s workload attestor")?,
    );
    let mut serve = tokio::spawn(async move {
        workload::serve_on(listener, &socket_path, snapshots, attestor, shutdown).await
    });
    tracing::info!(
        spiffe.id = %agent.spiffe_id,
        socket = %config.socket_path.display(),
        "agent started"
    );

    let first_applied = agent.first_applied.take();
    let readiness = tokio::spawn(mark_ready(first_applied, ready.clone()));

    let result = tokio::select! {
        signal = shutdown_signal() => match signal {
            Ok(name) => {
                tracing::info!(signal = name, "shutting down");
                Ok(())
            }
            Err(e) => Err(anyhow::Error::from(e).context("cannot listen for signals")),
        },
        error = agent.failed() => Err(error),
        served = &mut serve => Err(match served {
            Ok(Ok(())) => anyhow::anyhow!("the Workload API stopped"),
            Ok(Err(e)) => e.context("Workload API"),
            Err(e) => anyhow::anyhow!("the Workload API failed: {e}"),
        }),
    };

    readiness.abort();
    let _ = stop_tx.send(true);
    drop(agent);
    if !serve.is_finished()
        && tokio::time::timeout(SERVE_STOP_TIMEOUT, &mut serve)
            .await
            .is_err()
    {
        tracing::warn!("the Workload API did not stop in time");
        serve.abort();
    }
    if let Err(e) = remove_file_if_present(&ready) {
        tracing::warn!(error = %e, path = %ready.display(), "cannot remove the ready file");
    }
    result
}

/// The running agent, apart from the Workload API.
#[derive(Debug)]
pub(crate) struct Agent {
    /// The agent's SPIFFE ID.
    pub(crate) spiffe_id: SpiffeId,
    /// The snapshots the SVID manager publishes.
    pub(crate) snapshots: SnapshotReceiver,
    /// Completes once the first sync message has been applied.
    pub(crate) first_applied: Option<oneshot::Receiver<()>>,
    /// The sync, the manager and the renewal; dropping the set stops them.
    tasks: JoinSet<anyhow::Error>,
}

impl Agent {
    /// Connects to the server with `identity` and starts the entry sync, the
    /// SVID manager and the agent SVID renewal.
    pub(crate) fn start(
        config: &Config,
        storage: Storage,
        identity: NodeIdentity,
    ) -> anyhow::Result<Self> {
        let td = config.trust_domain.clone();
        let trust = Arc::new(TrustStore::new(&identity.bundle).context("trust bundle")?);
        let resolver = Arc::new(
            SvidResolver::new(identity.chain.clone(), &identity.key).context("agent SVID")?,
        );
        let tls = client::tls_config(&td, Arc::clone(&trust), Some(Arc::clone(&resolver)))?;
        let channel = Arc::new(AgentChannel::new(&config.server_address, tls));
        let renew_now = Arc::new(Notify::new());

        let manager = Manager::new(
            GrpcSigner::new(Arc::clone(&channel)),
            SystemClock,
            identity.bundle.clone(),
        )
        .with_key_type(config.workload_key_type);
        let snapshots = manager.subscribe();
        let (updates_tx, updates_rx) = mpsc::channel(64);
        let (first_tx, first_rx) = oneshot::channel();
        let sync = EntrySync::new(
            Arc::clone(&channel),
            td,
            Arc::clone(&trust),
            storage.clone(),
            updates_tx,
            first_tx,
            Arc::clone(&renew_now),
        );
        let spiffe_id = identity.spiffe_id.clone();
        let reattestation = config.node_attestor.reattests().then(|| Reattestation {
            address: config.server_address.clone(),
            td: config.trust_domain.clone(),
            attestor: config.node_attestor.clone(),
        });
        let renewer = Renewer::new(channel, storage, trust, resolver, identity, renew_now)
            .with_reattestation(reattestation);

        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            manager.run(updates_rx).await;
            anyhow::anyhow!("the SVID manager stopped")
        });
        tasks.spawn(async move { anyhow::Error::from(sync.run().await) });
        tasks.spawn(async move { anyhow::Error::from(renewer.run().await) });
        Ok(Self {
            spiffe_id,
            snapshots,
            first_applied: Some(first_rx),
            tasks,
        })
    }

    /// Waits for the first fatal error of a task.
    pub(crate) async fn failed(&mut self) -> anyhow::Error {
        match self.tasks.join_next().await {
            Some(Ok(error)) => error,
            Some(Err(e)) => anyhow::anyhow!("an agent task failed: {e}"),
            None => anyhow::anyhow!("the agent has no task left"),
        }
    }
}

/// Writes the ready file once the first sync message has been applied (the
/// Workload API socket is bound before this task starts).
async fn mark_ready(first_applied: Option<oneshot::Receiver<()>>, ready: PathBuf) {
    if let Some(first) = first_applied
        && first.await.is_err()
    {
        return;
    }
    match sigil::keys::write_public_file(&ready, b"") {
        Ok(()) => tracing::info!(path = %ready.display(), "agent ready"),
        Err(e) => {
            tracing::warn!(error = %e, path = %ready.display(), "cannot write the ready file")
        }
    }
}

/// Waits for SIGINT or SIGTERM and names it.
async fn shutdown_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    })
}

fn remove_file_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{JoinToken, JoinTokenSource, LogFormat};
    use crate::testing::{FakeServer, entry, td};

    async fn attested(server: &FakeServer, data: &Path) -> (Config, Storage, NodeIdentity) {
        server.add_token("t0ken");
        let config = Config {
            trust_domain: td(),
            server_address: server.addr.to_string(),
            trust_bundle_path: Some(server.bundle_path()),
            join_token: Some(JoinTokenSource::Inline(
                JoinToken::new("t0ken".into()).unwrap(),
            )),
            data_dir: data.to_owned(),
            socket_path: data.join("api.sock"),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            workload_key_type: Default::default(),
            workload_attestors: Default::default(),
            node_attestor: Default::default(),
        };
        let storage = Storage::new(data);
        let identity = node::establish(&config, &storage).await.unwrap();
        (config, storage, identity)
    }

    fn svid_ids(snapshot: &crate::cache::Snapshot) -> Vec<(String, String)> {
        snapshot
            .identities
            .iter()
            .filter_map(|i| {
                let svid = i.svid.as_ref()?;
                let id = sigil::x509::check_leaf(&svid.chain[0]).ok()?;
                Some((i.entry.id.clone(), id.to_string()))
            })
            .collect()
    }

    #[tokio::test]
    async fn syncs_entries_signs_their_svids_and_resyncs_only_differences() {
        let server = FakeServer::start().await;
        let data = tempfile::tempdir().unwrap();
        let (config, storage, identity) = attested(&server, data.path()).await;
        let agent_id = identity.spiffe_id.clone();
        server.upsert(entry("e1", "/web", &agent_id)).await;
        // Another agent's entry, and an entry the agent must ignore.
        let other: sigil::SpiffeId = "spiffe://example.org/sigil/agent/other".parse().unwrap();
        server.upsert(entry("e9", "/not-mine", &other)).await;
        let mut invalid = entry("bad", "/x", &agent_id);
        invalid.spiffe_id = "spiffe://elsewhere.org/x".into();
        server.upsert(invalid).await;

        let mut agent = Agent::start(&config, storage, identity).unwrap();
        assert_eq!(agent.spiffe_id, agent_id);
        agent.first_applied.take().unwrap().await.unwrap();
        let snapshot = agent.snapshots.borrow().clone();
        assert_eq!(
            svid_ids(&snapshot),
            [("e1".to_owned(), "spiffe://example.org/web".to_owned())]
        );
        assert_eq!(snapshot.identities.len(), 1, "the invalid entry is skipped");
        assert_eq!(snapshot.bundle_der.as_slice(), server.ca.cert().as_ref());
        assert!(data.path().join("bundle.pem").exists());

        // A pushed change is applied and signed.
        server.upsert(entry("e2", "/api", &agent_id)).await;
        let mut rx = agent.snapshots.clone();
        let snapshot = rx
            .wait_for(|s| svid_ids(s).len() == 2)
            .await
            .unwrap()
            .clone();
        assert_eq!(svid_ids(&snapshot)[1].1, "spiffe://example.org/api");
        let batches = server.state.lock().unwrap().batches.clone();
        assert_eq!(batches, [vec!["e1".to_owned()], vec!["e2".to_owned()]]);

        // After the stream breaks, the agent reconnects and sends what it
        // holds, so only differences come back.
        server.break_streams().await;
        server.wait_for(|s| s.sync_calls.len() == 2).await;
        let mut known = server.state.lock().unwrap().sync_calls[1].clone();
        known.sort();
        assert_eq!(known, [("e1".to_owned(), 1), ("e2".to_owned(), 1)]);
        let version = rx.borrow().version;
        server.upsert(entry("e3", "/db", &agent_id)).await;
        rx.wait_for(|s| svid_ids(s).len() == 3).await.unwrap();
        assert!(rx.borrow().version > version);
        assert_eq!(
            server.state.lock().unwrap().batches.len(),
            3,
            "nothing held was signed again"
        );
    }

    #[tokio::test]
    async fn calls_after_an_agent_svid_renewal_present_the_new_svid() {
        let server = FakeServer::start().await;
        // Issued 10 s back-dated, 12 s ahead: renewed about 1 s from now.
        server.state.lock().unwrap().agent_ttl = Some(Duration::from_secs(12));
        let data = tempfile::tempdir().unwrap();
        let (config, storage, identity) = attested(&server, data.path()).await;
        let agent_id = identity.spiffe_id.clone();
        let mut agent = Agent::start(&config, storage, identity).unwrap();
        agent.first_applied.take().unwrap().await.unwrap();

        // The fake, like the server, accepts only the latest agent SVID.
        server.wait_for(|s| s.renewals >= 1).await;
        server.upsert(entry("e1", "/web", &agent_id)).await;
        let mut rx = agent.snapshots.clone();
        let snapshot = tokio::time::timeout(
            Duration::from_secs(20),
            rx.wait_for(|s| svid_ids(s).len() == 1),
        )
        .await
        .unwrap()
        .unwrap()
        .clone();
        assert_eq!(svid_ids(&snapshot)[0].1, "spiffe://example.org/web");
    }

    #[tokio::test]
    async fn an_evicted_agent_stops_with_a_clear_error() {
        let server = FakeServer::start().await;
        let data = tempfile::tempdir().unwrap();
        let (config, storage, identity) = attested(&server, data.path()).await;
        server
            .state
            .lock()
            .unwrap()
            .evicted
            .insert(identity.spiffe_id.clone());
        let mut agent = Agent::start(&config, storage, identity).unwrap();
        let error = tokio::time::timeout(Duration::from_secs(20), agent.failed())
            .await
            .unwrap()
            .to_string();
        assert!(
            error.starts_with("the server refused the agent SVID (agent spiffe://example.org/sigil/agent/join_token/1 is evicted); a new join token is needed"),
            "{error}"
        );
        assert!(!data.path().join("agent_svid.pem").exists());
    }

    #[tokio::test]
    async fn ready_is_written_after_the_first_sync() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join(READY_FILE);
        let (applied, first) = oneshot::channel();
        let task = tokio::spawn(mark_ready(Some(first), ready.clone()));
        tokio::task::yield_now().await;
        assert!(!ready.exists(), "not before the first sync");
        applied.send(()).unwrap();
        task.await.unwrap();
        assert_eq!(std::fs::read(&ready).unwrap(), b"");
    }
}
