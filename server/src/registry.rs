//! The registration entries, all held in memory and indexed by parent ID,
//! with change notifications for the agents' sync streams.
//!
//! Every change is written to the [`Store`] first, then applied in memory;
//! subscribers are notified once the store has flushed, so a change an agent
//! hears about is durable.
//!
//! Expired entries (past their `expires_at`) entitle no agent to anything
//! and are deleted by [`expiry::prune`].
//!
//! Node aliases: an entry whose parent is the server's own ID
//! (`spiffe://<td>/sigil/server`) is an alias entry. Its SPIFFE ID is an
//! alias of every attested, non-banned agent whose node selectors, with the
//! implicit `spiffe_id:<agent ID>`, include all of the entry's selectors; the
//! entries under an alias are entitled to each of those agents. Alias
//! entries are indexed by their smallest selector, so resolving an agent's
//! aliases looks only at the alias entries that can match it.

pub(crate) mod expiry;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, PoisonError, RwLock};

use sigil::entry::FieldError;
use sigil::proto::sigil::types::v1 as pb;
use sigil::{Entry, Selector, Selectors, SpiffeId, TrustDomain};
use tokio::sync::{Mutex, watch};

use crate::clock;
use crate::store::{AgentRecord, Store, StoreError};

/// The type of the node selector every attested agent has implicitly:
/// `spiffe_id:<agent ID>`.
pub(crate) const SPIFFE_ID_SELECTOR: &str = "spiffe_id";

/// Why an entry could not be created, changed or deleted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegistryError {
    /// A field is malformed.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// The entry names itself as its parent.
    #[error("parent_id: must differ from spiffe_id")]
    ParentIsSelf,
    /// Another entry has the same SPIFFE ID, parent and selectors.
    #[error("entry with the same spiffe_id, parent_id and selectors exists: {0}")]
    Duplicate(String),
    /// An entry with the requested ID exists already.
    #[error("entry {0:?} already exists")]
    IdExists(String),
    /// No entry has this ID.
    #[error("no entry {0:?}")]
    NotFound(String),
    /// The entry ID is empty.
    #[error("is required")]
    MissingId,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RegistryError {
    /// The gRPC status code for this error.
    pub(crate) fn code(&self) -> tonic::Code {
        match self {
            Self::Invalid(_) | Self::ParentIsSelf | Self::MissingId => tonic::Code::InvalidArgument,
            Self::Duplicate(_) | Self::IdExists(_) => tonic::Code::AlreadyExists,
            Self::NotFound(_) => tonic::Code::NotFound,
            Self::Store(_) => tonic::Code::Internal,
        }
    }

    /// The message for item `item` of a request (e.g. `entries[2]`):
    /// `entries[2].spiffe_id: …`, or `entries[2]: …` when no single field is
    /// at fault. `id_field` names the field holding the entry ID, if the
    /// item is more than the ID.
    pub(crate) fn item_message(&self, item: &str, id_field: Option<&str>) -> String {
        match (self, id_field) {
            (Self::NotFound(_) | Self::MissingId | Self::IdExists(_), Some(field)) => {
                format!("{item}.{field}: {self}")
            }
            (
                Self::NotFound(_)
                | Self::MissingId
                | Self::IdExists(_)
                | Self::Duplicate(_)
                | Self::Store(_),
                _,
            ) => format!("{item}: {self}"),
            (Self::Invalid(_) | Self::ParentIsSelf, _) => format!("{item}.{self}"),
        }
    }

    /// The message for a node alias made from the request field `field`
    /// (the alias entry's SPIFFE ID): `alias_id: "spiffe://…" …`.
    pub(crate) fn alias_message(&self, field: &str) -> String {
        match self {
            Self::Invalid(e) if e.field == "spiffe_id" => format!("{field}: {}", e.reason),
            other => format!("{field}: {other}"),
        }
    }
}

/// How a selector filter compares with an entry's selectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SelectorMatch {
    /// The entry has exactly the given selectors.
    Exact,
    /// Every selector of the entry is among the given ones.
    Subset,
    /// The entry has every given selector, and maybe more.
    Superset,
    /// The entry has at least one of the given selectors.
    Any,
}

/// Filters and position of one page of [`Registry::list`]; [`Registry::count`]
/// uses only the filters.
#[derive(Debug, Default)]
pub(crate) struct ListQuery<'a> {
    /// Only the entry with this ID.
    pub(crate) id: Option<&'a str>,
    /// Only entries with this SPIFFE ID.
    pub(crate) spiffe_id: Option<&'a SpiffeId>,
    /// Only entries with this parent.
    pub(crate) parent_id: Option<&'a SpiffeId>,
    /// Only entries federating with every one of these trust domains.
    pub(crate) federates_with: &'a [TrustDomain],
    /// Only entries with exactly this hint.
    pub(crate) hint: Option<&'a str>,
    /// Only entries whose selectors relate to these as the mode says.
    pub(crate) selectors: Option<(&'a Selectors, SelectorMatch)>,
    /// Only entries whose ID sorts after this one.
    pub(crate) after: Option<&'a str>,
    /// At most this many entries.
    pub(crate) limit: usize,
}

// === impl SelectorMatch ===

impl SelectorMatch {
    /// Whether an entry with `selectors` matches the filter `given`.
    fn matches(self, selectors: &Selectors, given: &Selectors) -> bool {
        match self {
            Self::Exact => selectors == given,
            Self::Subset => selectors.is_subset_of(given),
            Self::Superset => given.is_subset_of(selectors),
            Self::Any => {
                let theirs: BTreeSet<_> = selectors.iter().collect();
                given.iter().any(|s| theirs.contains(s))
            }
        }
    }
}

// === impl ListQuery ===

impl ListQuery<'_> {
    /// Whether `entry` passes every filter.
    fn matches(&self, entry: &Entry) -> bool {
        self.id.is_none_or(|id| entry.id == id)
            && self.spiffe_id.is_none_or(|id| entry.spiffe_id == *id)
            && self.parent_id.is_none_or(|id| entry.parent_id == *id)
            && self.hint.is_none_or(|hint| entry.hint == hint)
            && self
                .federates_with
                .iter()
                .all(|td| entry.federates_with.binary_search(td).is_ok())
            && self
                .selectors
                .is_none_or(|(given, mode)| mode.matches(&entry.selectors, given))
    }
}

#[derive(Debug)]
struct Index {
    /// The server's own ID: the parent of alias entries.
    server_id: SpiffeId,
    entries: BTreeMap<String, Arc<Entry>>,
    by_parent: HashMap<SpiffeId, BTreeSet<String>>,
    /// Alias entries by their smallest selector. An alias applies to an
    /// agent only if that selector is among the agent's, so the agent's
    /// own selectors find every candidate, each exactly once.
    aliases: HashMap<Selector, BTreeSet<String>>,
}

/// All registration entries of the trust domain.
#[derive(Debug)]
pub(crate) struct Registry {
    td: TrustDomain,
    store: Arc<dyn Store>,
    index: RwLock<Index>,
    /// Serializes writers, so validation and write see a stable index.
    writer: Mutex<()>,
    changes: watch::Sender<u64>,
}

// === impl Index ===

impl Index {
    fn new(server_id: SpiffeId) -> Self {
        Self {
            server_id,
            entries: BTreeMap::new(),
            by_parent: HashMap::new(),
            aliases: HashMap::new(),
        }
    }

    /// The selector an alias entry is indexed under, if `entry` is one.
    fn alias_key<'e>(&self, entry: &'e Entry) -> Option<&'e Selector> {
        if entry.parent_id == self.server_id {
            entry.selectors.iter().next()
        } else {
            None
        }
    }

    fn insert(&mut self, entry: Arc<Entry>) {
        self.remove(&entry.id);
        self.by_parent
            .entry(entry.parent_id.clone())
            .or_default()
            .insert(entry.id.clone());
        if let Some(key) = self.alias_key(&entry) {
            self.aliases
                .entry(key.clone())
                .or_default()
                .insert(entry.id.clone());
        }
        self.entries.insert(entry.id.clone(), entry);
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Entry>> {
        let old = self.entries.remove(id)?;
        if let Some(ids) = self.by_parent.get_mut(&old.parent_id) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_parent.remove(&old.parent_id);
            }
        }
        if let Some(key) = self.alias_key(&old)
            && let Some(ids) = self.aliases.get_mut(key)
        {
            ids.remove(id);
            if ids.is_empty() {
                self.aliases.remove(key);
            }
        }
        Some(old)
    }

    /// The aliases of an agent with the node selectors `node` (including
    /// the implicit one) at `now`, sorted and without duplicates. Expired
    /// alias entries give no alias.
    fn aliases(&self, node: &Selectors, now: i64) -> BTreeSet<SpiffeId> {
        node.iter()
            .filter_map(|s| self.aliases.get(s))
            .flatten()
            .filter_map(|id| self.entries.get(id))
            .filter(|e| !e.is_expired(now) && e.selectors.is_subset_of(node))
            .map(|e| e.spiffe_id.clone())
            .collect()
    }

    /// The ID of another entry registering the same thing as `entry`.
    fn duplicate_of(&self, entry: &Entry) -> Option<String> {
        self.by_parent
            .get(&entry.parent_id)?
            .iter()
            .filter(|id| **id != entry.id)
            .filter_map(|id| self.entries.get(id))
            .find(|other| other.same_registration(entry))
            .map(|other| other.id.clone())
    }

    /// The entries an agent with the ID `agent` and the aliases `aliases`
    /// is entitled to at `now`. An expired entry is skipped, and so are the
    /// entries below it. The server's ID is never followed, so alias entries
    /// themselves are never entitled.
    fn entitled(&self, agent: &SpiffeId, aliases: BTreeSet<SpiffeId>, now: i64) -> Vec<Arc<Entry>> {
        let mut out = Vec::new();
        let mut seen_parents = HashSet::from([self.server_id.clone(), agent.clone()]);
        let mut queue = VecDeque::from([agent.clone()]);
        for alias in aliases {
            if seen_parents.insert(alias.clone()) {
                queue.push_back(alias);
            }
        }
        while let Some(parent) = queue.pop_front() {
            let Some(ids) = self.by_parent.get(&parent) else {
                continue;
            };
            let entries = ids.iter().filter_map(|id| self.entries.get(id));
            for entry in entries.filter(|e| !e.is_expired(now)) {
                out.push(Arc::clone(entry));
                if seen_parents.insert(entry.spiffe_id.clone()) {
                    queue.push_back(entry.spiffe_id.clone());
                }
            }
        }
        out
    }
}

// === impl Registry ===

impl Registry {
    /// Loads every entry from the store.
    pub(crate) async fn load(td: TrustDomain, store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let mut index = Index::new(td.server_id());
        for entry in store.list_entries().await? {
            index.insert(Arc::new(entry));
        }
        Ok(Self {
            td,
            store,
            index: RwLock::new(index),
            writer: Mutex::new(()),
            changes: watch::Sender::new(0),
        })
    }

    /// A receiver whose value changes whenever entries change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// How many entries there are.
    pub(crate) fn len(&self) -> usize {
        self.read(|index| index.entries.len())
    }

    /// One entry.
    pub(crate) fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.read(|index| index.entries.get(id).cloned())
    }

    /// The entries an agent is entitled to: those whose parent is the agent
    /// or one of its aliases, and recursively those whose parent is the
    /// SPIFFE ID of an entitled entry. Expired entries are left out; a
    /// banned agent is entitled to nothing.
    pub(crate) fn entitled(&self, agent: &AgentRecord) -> Vec<Arc<Entry>> {
        if agent.banned {
            return Vec::new();
        }
        let now = clock::now_unix();
        let node = node_selectors(agent);
        self.read(|index| {
            let aliases = index.aliases(&node, now);
            index.entitled(&agent.spiffe_id, aliases, now)
        })
    }

    /// Creates the node alias `alias` of the agent `agent`: an entry with
    /// the SPIFFE ID `alias`, the server's ID as parent and the single
    /// selector `spiffe_id:<agent>`.
    pub(crate) async fn create_alias(
        &self,
        alias: &str,
        agent: &SpiffeId,
    ) -> Result<Arc<Entry>, RegistryError> {
        let item = pb::Entry {
            spiffe_id: alias.to_owned(),
            parent_id: self.td.server_id().to_string(),
            selectors: vec![pb::Selector {
                r#type: SPIFFE_ID_SELECTOR.to_owned(),
                value: agent.to_string(),
            }],
            ..Default::default()
        };
        let _writer = self.writer.lock().await;
        let mut results = [self.create_one(&item).await];
        self.commit(&mut results).await;
        let [result] = results;
        result
    }

    /// How many entries pass the filters of `query`.
    pub(crate) fn count(&self, query: &ListQuery<'_>) -> usize {
        self.read(|index| index.entries.values().filter(|e| query.matches(e)).count())
    }

    /// The earliest `expires_at` of all entries, if any entry expires.
    pub(crate) fn next_expiry(&self) -> Option<i64> {
        self.read(|index| index.entries.values().filter_map(|e| e.expires_at).min())
    }

    /// Deletes the entries expired at `now`, as [`Registry::delete`] does
    /// (agents hear about it), and returns them.
    pub(crate) async fn prune_expired(&self, now: i64) -> Vec<Result<Arc<Entry>, RegistryError>> {
        let _writer = self.writer.lock().await;
        let expired: Vec<String> = self.read(|index| {
            index
                .entries
                .values()
                .filter(|e| e.is_expired(now))
                .map(|e| e.id.clone())
                .collect()
        });
        let mut results = Vec::with_capacity(expired.len());
        for id in &expired {
            results.push(self.delete_one(id).await);
        }
        self.commit(&mut results).await;
        results
    }

    /// One page of entries, sorted by ID, and whether more follow.
    pub(crate) fn list(&self, query: &ListQuery<'_>) -> (Vec<Arc<Entry>>, bool) {
        self.read(|index| {
            let start = query
                .after
                .map_or(Bound::Unbounded, |id| Bound::Excluded(id.to_owned()));
            let mut page: Vec<Arc<Entry>> = index
                .entries
                .range((start, Bound::Unbounded))
                .map(|(_, e)| e)
                .filter(|e| query.matches(e))
                .take(query.limit.saturating_add(1))
                .cloned()
                .collect();
            let more = page.len() > query.limit;
            page.truncate(query.limit);
            (page, more)
        })
    }

    /// Creates entries; each gets a revision and creation time, and a new ID
    /// unless it comes with one.
    pub(crate) async fn create(
        &self,
        items: &[pb::Entry],
    ) -> Vec<Result<Arc<Entry>, RegistryError>> {
        let _writer = self.writer.lock().await;
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            results.push(self.create_one(item).await);
        }
        self.commit(&mut results).await;
        results
    }

    async fn create_one(&self, item: &pb::Entry) -> Result<Arc<Entry>, RegistryError> {
        let mut entry = self.validate(item)?;
        if entry.id.is_empty() {
            entry.id = uuid::Uuid::new_v4().to_string();
        } else if self.get(&entry.id).is_some() {
            return Err(RegistryError::IdExists(entry.id));
        }
        if let Some(existing) = self.read(|index| index.duplicate_of(&entry)) {
            return Err(RegistryError::Duplicate(existing));
        }
        entry.revision = self.store.next_revision().await?;
        entry.created_at = clock::now_unix();
        self.write(entry).await
    }

    /// Replaces entries, matched by ID; each keeps its creation time and
    /// gets a new revision.
    pub(crate) async fn update(
        &self,
        items: &[pb::Entry],
    ) -> Vec<Result<Arc<Entry>, RegistryError>> {
        let _writer = self.writer.lock().await;
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            results.push(self.update_one(item).await);
        }
        self.commit(&mut results).await;
        results
    }

    async fn update_one(&self, item: &pb::Entry) -> Result<Arc<Entry>, RegistryError> {
        if item.id.is_empty() {
            return Err(RegistryError::MissingId);
        }
        let current = self
            .get(&item.id)
            .ok_or_else(|| RegistryError::NotFound(item.id.clone()))?;
        let mut entry = self.validate(item)?;
        if let Some(existing) = self.read(|index| index.duplicate_of(&entry)) {
            return Err(RegistryError::Duplicate(existing));
        }
        entry.created_at = current.created_at;
        entry.revision = self.store.next_revision().await?;
        self.write(entry).await
    }

    /// Deletes entries by ID and returns them as they were.
    pub(crate) async fn delete(&self, ids: &[String]) -> Vec<Result<Arc<Entry>, RegistryError>> {
        let _writer = self.writer.lock().await;
        let mut results = Vec::with_capacity(ids.len());
        for id in ids {
            results.push(self.delete_one(id).await);
        }
        self.commit(&mut results).await;
        results
    }

    async fn delete_one(&self, id: &str) -> Result<Arc<Entry>, RegistryError> {
        if id.is_empty() {
            return Err(RegistryError::MissingId);
        }
        if self.get(id).is_none() {
            return Err(RegistryError::NotFound(id.to_owned()));
        }
        self.store.delete_entry(id).await?;
        let removed = self.modify(|index| index.remove(id));
        removed.ok_or_else(|| RegistryError::NotFound(id.to_owned()))
    }

    fn validate(&self, item: &pb::Entry) -> Result<Entry, RegistryError> {
        let entry = Entry::from_proto(item, &self.td)?;
        if entry.parent_id == entry.spiffe_id {
            return Err(RegistryError::ParentIsSelf);
        }
        Ok(entry)
    }

    async fn write(&self, entry: Entry) -> Result<Arc<Entry>, RegistryError> {
        self.store.put_entry(&entry).await?;
        let entry = Arc::new(entry);
        self.modify(|index| index.insert(Arc::clone(&entry)));
        Ok(entry)
    }

    /// Flushes the store after a batch and notifies subscribers. If the
    /// flush fails, the changed items report it.
    async fn commit(&self, results: &mut [Result<Arc<Entry>, RegistryError>]) {
        if !results.iter().any(Result::is_ok) {
            return;
        }
        let flushed = self.store.flush().await;
        self.changes.send_modify(|version| *version += 1);
        if let Err(e) = flushed {
            let message = e.to_string();
            for result in results.iter_mut() {
                if result.is_ok() {
                    *result = Err(StoreError::Backend(message.clone()).into());
                }
            }
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        // The index is only changed by whole-value operations that cannot
        // panic half-way, so a poisoned lock still holds a consistent index.
        f(&self.index.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn modify<T>(&self, f: impl FnOnce(&mut Index) -> T) -> T {
        f(&mut self.index.write().unwrap_or_else(PoisonError::into_inner))
    }
}

/// An agent's node selectors with the implicit `spiffe_id:<agent ID>`. An
/// ID too long to be a selector value gets no implicit selector (no alias
/// entry could name it either).
pub(crate) fn node_selectors(agent: &AgentRecord) -> Selectors {
    let mut node = agent.selectors.clone();
    if let Ok(own) = Selector::new(SPIFFE_ID_SELECTOR, agent.spiffe_id.as_str()) {
        node.insert(own);
    }
    node
}

#[cfg(test)]
mod tests;
