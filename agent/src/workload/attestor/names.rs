//! User and group names, looked up through NSS and kept for a short while.
//!
//! A lookup may block for long (NSS may ask `systemd-userdbd`, `sssd` or an
//! LDAP server), so it runs on a blocking thread; its answer, including
//! "no such user", is kept for [`NAME_TTL`] so that attesting a caller is
//! otherwise done without leaving the calling task.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::unistd::{Gid, Group, Uid, User};
use tokio::time::Instant;

/// How long a looked-up name is used before it is looked up again: a user
/// or group renamed on the system shows in selectors after at most this.
pub(crate) const NAME_TTL: Duration = Duration::from_secs(30);

/// Most names kept per kind; past it the cache starts over.
const MAX_ENTRIES: usize = 4096;

/// Whose name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Id {
    User(u32),
    Group(u32),
}

#[derive(Debug)]
struct Cached {
    name: Option<Arc<str>>,
    until: Instant,
}

/// Names of uids and gids.
#[derive(Debug, Default)]
pub(crate) struct NameCache {
    names: Mutex<HashMap<Id, Cached>>,
}

impl NameCache {
    /// The name of user `uid`, or `None` if it has none (or the lookup
    /// failed).
    pub(crate) async fn user(self: &Arc<Self>, uid: u32) -> Option<Arc<str>> {
        self.name(Id::User(uid)).await
    }

    /// The name of group `gid`, or `None` if it has none (or the lookup
    /// failed).
    pub(crate) async fn group(self: &Arc<Self>, gid: u32) -> Option<Arc<str>> {
        self.name(Id::Group(gid)).await
    }

    async fn name(self: &Arc<Self>, id: Id) -> Option<Arc<str>> {
        let now = Instant::now();
        if let Some(cached) = lock(&self.names).get(&id).filter(|c| c.until > now) {
            return cached.name.clone();
        }
        let looked_up = tokio::task::spawn_blocking(move || look_up(id)).await;
        let name = match looked_up {
            Ok(Ok(name)) => name.map(Arc::<str>::from),
            Ok(Err(e)) => {
                // Not kept: the next caller tries again.
                tracing::debug!(id = ?id, error = %e, "name lookup failed");
                return None;
            }
            Err(e) => {
                tracing::debug!(id = ?id, error = %e, "name lookup task failed");
                return None;
            }
        };
        let mut names = lock(&self.names);
        if names.len() >= MAX_ENTRIES {
            names.clear();
        }
        names.insert(
            id,
            Cached {
                name: name.clone(),
                until: Instant::now() + NAME_TTL,
            },
        );
        name
    }
}

fn look_up(id: Id) -> nix::Result<Option<String>> {
    match id {
        Id::User(uid) => Ok(User::from_uid(Uid::from_raw(uid))?.map(|u| u.name)),
        Id::Group(gid) => Ok(Group::from_gid(Gid::from_raw(gid))?.map(|g| g.name)),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A map of plain values stays consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_are_the_systems() {
        let names = Arc::new(NameCache::default());
        let expected = User::from_uid(Uid::from_raw(0)).unwrap().map(|u| u.name);
        assert_eq!(names.user(0).await.as_deref(), expected.as_deref());
        let expected = Group::from_gid(Gid::from_raw(0)).unwrap().map(|g| g.name);
        assert_eq!(names.group(0).await.as_deref(), expected.as_deref());
        assert_eq!(names.user(u32::MAX - 7).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_is_kept_for_the_ttl_then_looked_up_again() {
        let names = Arc::new(NameCache::default());
        let uid = u32::MAX - 7;
        assert_eq!(names.user(uid).await, None);

        // Plant a different answer: it is served while it is fresh...
        let planted = |until| Cached {
            name: Some(Arc::from("planted")),
            until,
        };
        lock(&names.names).insert(Id::User(uid), planted(Instant::now() + NAME_TTL));
        tokio::time::advance(NAME_TTL - Duration::from_secs(1)).await;
        assert_eq!(names.user(uid).await.as_deref(), Some("planted"));
        // ...and replaced by a new lookup once it is stale.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(names.user(uid).await, None);
    }
}
