//! `sigil-server run`: opens the state, starts both APIs, and runs until
//! SIGINT or SIGTERM.
//!
//! The agent API's TLS port also serves the admin API (and the local
//! authority API) to admin workloads; the Unix socket serves them to local
//! users. See [`crate::api::admin::access`].
//!
//! The state is in `<data_dir>/store` (sled) or, with `[store] backend =
//! "postgres"`, in a PostgreSQL database. Files in the data directory
//! besides the state: `agent-api.addr` (the
//! agent API's bound address, written once it listens), `ready` (written
//! once both APIs accept connections, removed on shutdown) and, unless
//! `audit_log_path` puts it elsewhere, `audit.log`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sigil::keys::write_public_file;
use sigil::proto::sigil::admin::v1::admin_server::AdminServer;
use sigil::proto::sigil::admin::v1::local_authority_server::LocalAuthorityServer;
use sigil::proto::sigil::agent::v1::agent_api_server::AgentApiServer;
use sigil::tls::{SpiffeClientVerifier, SvidResolver, TrustStore};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::api::Services;
use crate::api::admin::AdminService;
use crate::api::admin::access::{Gate, Transport};
use crate::api::agent::AgentService;
use crate::api::federation::FederatedBundles;
use crate::api::localauthority::LocalAuthorityService;
use crate::attest::NodeAttestors;
use crate::audit::AuditLog;
use crate::ca::live::LiveSvids;
use crate::ca::{Ca, create_private_dir, rotation, server_svid};
use crate::clock::Clock;
use crate::config::{Config, StoreConfig};
use crate::listen;
use crate::registry::{ListQuery, Registry, expiry};
use crate::shutdown::{self, Trigger};
use crate::store::{PostgresStore, SledStore, Store};
use crate::tokens::JoinTokens;

/// How long open connections get to finish after shutdown starts.
const GRACE: Duration = Duration::from_secs(10);

/// How often an idle agent connection is pinged, so the sync streams of
/// agents that vanished without closing their connection end.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);

/// How long a ping may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Largest request the agent API accepts (a full batch of CSRs, or a sync
/// request listing 100 000 known entries).
const MAX_AGENT_REQUEST: usize = 16 * 1024 * 1024;

/// A running server.
#[derive(Debug)]
pub(crate) struct Running {
    trigger: Trigger,
    fatal: mpsc::Receiver<String>,
    tasks: Vec<JoinHandle<()>>,
    store: Arc<dyn Store>,
    data_dir: PathBuf,
    admin_socket: PathBuf,
}

/// Runs the server until SIGINT or SIGTERM.
pub(crate) async fn run(config: Config) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut server = start(&config).await?;
    let outcome = tokio::select! {
        _ = sigterm.recv() => {
            tracing::info!("SIGTERM received; shutting down");
            Ok(())
        }
        _ = sigint.recv() => {
            tracing::info!("SIGINT received; shutting down");
            Ok(())
        }
        failure = server.fatal.recv() => {
            Err(anyhow::anyhow!(failure.unwrap_or_else(|| "a listener stopped".into())))
        }
    };
    server.stop().await?;
    outcome
}

/// Opens the state, starts both APIs and writes the `ready` file.
pub(crate) async fn start(config: &Config) -> anyhow::Result<Running> {
    let data_dir = config.data_dir.clone();
    create_private_dir(&data_dir)?;
    let addr_file = data_dir.join("agent-api.addr");
    let ready_file = data_dir.join("ready");
    remove_if_present(&ready_file)?;
    remove_if_present(&addr_file)?;

    let td = config.trust_domain.clone();
    let (store, connection_lost): (Arc<dyn Store>, _) = match &config.store {
        StoreConfig::Sled => (
            Arc::new(
                SledStore::open(&data_dir.join("store"))
                    .with_context(|| format!("opening the store in {}", data_dir.display()))?,
            ),
            None,
        ),
        StoreConfig::Postgres(postgres) => {
            let (store, lost) = PostgresStore::connect(postgres)
                .await
                .context("opening the PostgreSQL store")?;
            tracing::info!("state kept in PostgreSQL");
            (Arc::new(store), Some(lost))
        }
    };
    let keys = crate::ca::keys::KeyManager::from_config(config, &data_dir.join("ca"))?;
    let schedule = rotation::Schedule::load_with(
        Arc::clone(&store),
        Arc::new(keys),
        &td,
        config.ca_ttl,
        Clock::System,
    )
    .await?;
    let ca = Arc::new(Ca::new(
        schedule.published()?,
        rotation::max_svid_ttl(config.ca_ttl),
    ));
    let svids = Arc::new(LiveSvids::load(Arc::clone(&store), crate::clock::now_unix()).await?);
    let authorities = rotation::Authorities::new(schedule, Arc::clone(&ca), Arc::clone(&svids));
    let default_x509_svid_ttl = rotation::cap_svid_ttl(
        "default_x509_svid_ttl",
        config.default_x509_svid_ttl,
        config.ca_ttl,
    );
    let agent_svid_ttl =
        rotation::cap_svid_ttl("agent_svid_ttl", config.agent_svid_ttl, config.ca_ttl);
    let registry = Arc::new(Registry::load(td.clone(), Arc::clone(&store)).await?);
    tracing::info!(entries = registry.len(), "loaded the registration entries");
    let (stored, _) = registry.list(&ListQuery {
        limit: usize::MAX,
        ..ListQuery::default()
    });
    rotation::warn_capped_entries(
        stored.iter().map(|e| &**e),
        rotation::max_svid_ttl(config.ca_ttl),
    );
    let tokens = Arc::new(JoinTokens::new(td, Arc::clone(&store)));
    let federated = FederatedBundles::load(&*store)
        .await
        .context("loading the federated bundles")?;
    let (trigger, shutdown) = shutdown::channel();

    let published = ca.current();
    let svid = server_svid::issue(&published.active, default_x509_svid_ttl)?;
    let resolver = Arc::new(SvidResolver::new(svid.chain.clone(), &svid.key)?);
    let trust = Arc::new(TrustStore::new(&published.bundle)?);
    let tls = sigil::tls::server_config(
        Arc::clone(&resolver),
        Arc::new(SpiffeClientVerifier::new(Arc::clone(&trust))),
    )?;

    let services = Arc::new(Services {
        ca: Arc::clone(&ca),
        store: Arc::clone(&store),
        registry,
        tokens,
        default_x509_svid_ttl,
        agent_svid_ttl,
        shutdown: shutdown.clone(),
        agents: Default::default(),
        svids,
        federated,
    });

    let tcp = TcpListener::bind(config.bind_address)
        .await
        .with_context(|| format!("binding the agent API to {}", config.bind_address))?;
    let agent_api = tcp
        .local_addr()
        .context("reading the agent API's address")?;
    let uds = listen::bind_admin_socket(
        &config.admin_socket_path,
        config.admin_socket_group.as_ref(),
    )
    .await?;

    let audit = AuditLog::open(&config.audit_log_path)
        .with_context(|| format!("opening the audit log {}", config.audit_log_path.display()))?;
    let admin = AdminService::new(Arc::clone(&services), audit.clone());
    let local_authority = LocalAuthorityService::new(admin.clone(), Arc::clone(&authorities));
    let local_gate = Arc::new(Gate::new(
        Transport::Local {
            server_uid: nix::unistd::geteuid().as_raw(),
            group_access: config.admin_socket_group.is_some(),
        },
        Arc::clone(&services),
        audit.clone(),
    ));
    let mtls_gate = Arc::new(Gate::new(Transport::Mtls, Arc::clone(&services), audit));

    let (fatal_tx, fatal) = mpsc::channel(3);
    let mut tasks = Vec::new();
    if let Some(lost) = connection_lost {
        // Without its database (and the database's lock) the server stops.
        let fatal = fatal_tx.clone();
        tokio::spawn(async move {
            if let Ok(reason) = lost.await {
                tracing::error!(reason = %reason, "lost the store");
                let _ = fatal.send(reason).await;
            }
        });
    }

    let agent_service = AgentApiServer::new(AgentService::new(
        Arc::clone(&services),
        Arc::new(
            NodeAttestors::load(
                &config.trust_domain,
                &config.node_attestors,
                Arc::clone(&store),
            )
            .await
            .context("loading the used k8s_psat tokens")?,
        ),
    ))
    .max_decoding_message_size(MAX_AGENT_REQUEST);
    let incoming = listen::tls_incoming(
        tcp,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        shutdown.clone(),
    );
    let serving = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(agent_service)
        .add_service(mtls_gate.guard(AdminServer::new(admin.clone())))
        .add_service(mtls_gate.guard(LocalAuthorityServer::new(local_authority.clone())))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().wait_owned());
    tasks.push(supervise("agent API", serving, fatal_tx.clone()));
    tracing::info!(address = %agent_api, "agent API listening (and the admin API, for admin workloads)");
    write_public_file(&addr_file, agent_api.to_string().as_bytes())
        .with_context(|| format!("writing {}", addr_file.display()))?;

    let serving = Server::builder()
        .add_service(local_gate.guard(AdminServer::new(admin)))
        .add_service(local_gate.guard(LocalAuthorityServer::new(local_authority)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(uds), shutdown.clone().wait_owned());
    tasks.push(supervise("admin API", serving, fatal_tx));
    tracing::info!(path = %config.admin_socket_path.display(), "admin API listening");

    tasks.push(tokio::spawn(expiry::prune(
        Arc::clone(&services.registry),
        shutdown.clone(),
    )));

    tasks.push(tokio::spawn(rotation::run(authorities, shutdown.clone())));

    tasks.push(tokio::spawn(server_svid::rotate(
        Arc::clone(&ca),
        resolver,
        trust,
        default_x509_svid_ttl,
        svid,
        published.active_id.clone(),
        shutdown,
    )));

    write_public_file(&ready_file, b"")
        .with_context(|| format!("writing {}", ready_file.display()))?;
    tracing::info!(trust_domain = %config.trust_domain, "server ready");

    Ok(Running {
        trigger,
        fatal,
        tasks,
        store,
        data_dir,
        admin_socket: config.admin_socket_path.clone(),
    })
}

impl Running {
    /// Stops accepting, ends open streams, waits (a bounded time) for the
    /// connections to close, and flushes the store.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.trigger.fire();
        let tasks = futures::future::join_all(self.tasks);
        if tokio::time::timeout(GRACE, tasks).await.is_err() {
            tracing::warn!(
                grace_secs = GRACE.as_secs(),
                "some connections did not close in time"
            );
        }
        self.store.flush().await.context("flushing the store")?;
        let _ = remove_if_present(&self.data_dir.join("ready"));
        let _ = remove_if_present(&self.admin_socket);
        tracing::info!("server stopped");
        Ok(())
    }
}

/// Runs a server future; its failure is reported on `fatal`.
fn supervise(
    name: &'static str,
    serving: impl Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
    fatal: mpsc::Sender<String>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = serving.await {
            tracing::error!(error = %e, "{name} failed");
            let _ = fatal.send(format!("{name}: {e}")).await;
        }
    })
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}
