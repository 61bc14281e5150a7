//! SHA-256 digests of executables, computed once per file version.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

/// Executables larger than this are not hashed (1 GiB): the attestation of
/// their processes carries no `unix:sha256` selector.
pub(crate) const MAX_HASHED_SIZE: u64 = 1 << 30;

/// Most digests kept; past it the cache starts over. Every version of every
/// binary that has called the Workload API takes one slot.
const MAX_ENTRIES: usize = 4096;

/// One version of one file: its resolved path and what changes when the
/// file is replaced or rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileVersion {
    path: PathBuf,
    mtime: (i64, i64),
    size: u64,
    inode: u64,
}

impl FileVersion {
    fn new(path: &Path, meta: &Metadata) -> Self {
        Self {
            path: path.to_owned(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            size: meta.size(),
            inode: meta.ino(),
        }
    }
}

/// The digest of one file version, filled by the first caller that needs it;
/// callers asking for the same version meanwhile wait for that result
/// instead of hashing the file again.
type Slot = Arc<Mutex<Option<Arc<str>>>>;

/// What the cache knows about a file, without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The digest, computed earlier.
    Digest(Arc<str>),
    /// The file is larger than [`MAX_HASHED_SIZE`]: it has no digest.
    TooLarge,
    /// Not computed yet (or being computed): call [`DigestCache::sha256`].
    Unknown,
}

/// A cache of SHA-256 digests keyed by (path, mtime, size, inode), so each
/// version of a binary is read and hashed once.
///
/// Its methods do blocking file I/O: call them from a blocking thread.
#[derive(Debug, Default)]
pub(crate) struct DigestCache {
    slots: Mutex<HashMap<FileVersion, Slot>>,
    hashed: AtomicU64,
}

impl DigestCache {
    /// What is known about `file` (under `path`) without reading it; costs
    /// one `stat` and never waits for a digest being computed.
    pub(crate) fn lookup(&self, path: &Path, file: &Path) -> io::Result<Lookup> {
        let meta = std::fs::metadata(file)?;
        if meta.len() > MAX_HASHED_SIZE {
            return Ok(Lookup::TooLarge);
        }
        let version = FileVersion::new(path, &meta);
        let Some(slot) = lock(&self.slots).get(&version).map(Arc::clone) else {
            return Ok(Lookup::Unknown);
        };
        let digest = match slot.try_lock() {
            Ok(digest) => digest.clone(),
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner().clone(),
            Err(TryLockError::WouldBlock) => None,
        };
        Ok(digest.map_or(Lookup::Unknown, Lookup::Digest))
    }

    /// The lowercase hex SHA-256 of `file`, cached under `path`.
    ///
    /// `file` is what is read, e.g. `/proc/<pid>/exe`, which opens the very
    /// file the process runs even if its path has been replaced since;
    /// `path` is the name it is known by. Returns `None` for a file larger
    /// than [`MAX_HASHED_SIZE`] or one that changed while it was read.
    pub(crate) fn sha256(&self, path: &Path, file: &Path) -> io::Result<Option<Arc<str>>> {
        let meta = std::fs::metadata(file)?;
        if meta.len() > MAX_HASHED_SIZE {
            return Ok(None);
        }
        let version = FileVersion::new(path, &meta);
        let slot = {
            let mut slots = lock(&self.slots);
            match slots.get(&version) {
                Some(slot) => Arc::clone(slot),
                None => {
                    if slots.len() >= MAX_ENTRIES {
                        slots.clear();
                    }
                    let slot = Slot::default();
                    slots.insert(version.clone(), Arc::clone(&slot));
                    slot
                }
            }
        };

        let mut digest = lock(&slot);
        if let Some(hex) = digest.as_ref() {
            return Ok(Some(Arc::clone(hex)));
        }
        let mut opened = File::open(file)?;
        if FileVersion::new(path, &opened.metadata()?) != version {
            return Ok(None);
        }
        let hex = sha256_hex(&mut opened)?;
        if FileVersion::new(path, &opened.metadata()?) != version {
            return Ok(None);
        }
        self.hashed.fetch_add(1, Ordering::Relaxed);
        let hex: Arc<str> = hex.into();
        *digest = Some(Arc::clone(&hex));
        Ok(Some(hex))
    }

    /// How many files have been hashed (cache misses).
    #[cfg(test)]
    pub(crate) fn hashed(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent even if a holder
    // panicked: a slot is either filled or not.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Hashes a file and returns the digest as lowercase hex.
fn sha256_hex(file: &mut File) -> io::Result<String> {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => context.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex(context.finish().as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    /// `printf 'hello\n' | sha256sum`
    const HELLO_SHA256: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";

    #[test]
    fn digest_is_the_files_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::write(&path, b"hello\n").unwrap();
        let cache = DigestCache::default();
        assert_eq!(
            cache.sha256(&path, &path).unwrap().as_deref(),
            Some(HELLO_SHA256)
        );
    }

    #[test]
    fn each_file_version_is_hashed_once_and_mtime_is_part_of_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::write(&path, b"hello\n").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
            .unwrap();
        let cache = DigestCache::default();

        cache.sha256(&path, &path).unwrap();
        cache.sha256(&path, &path).unwrap();
        assert_eq!(cache.hashed(), 1, "the second lookup is a cache hit");

        // Same inode, same size, same bytes: only the mtime differs.
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000))
            .unwrap();
        let digest = cache.sha256(&path, &path).unwrap();
        assert_eq!(cache.hashed(), 2, "a new mtime is a new version");
        assert_eq!(digest.as_deref(), Some(HELLO_SHA256));
    }

    #[test]
    fn lookup_reports_only_what_was_computed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::write(&path, b"hello\n").unwrap();
        let cache = DigestCache::default();
        assert_eq!(cache.lookup(&path, &path).unwrap(), Lookup::Unknown);
        cache.sha256(&path, &path).unwrap();
        assert_eq!(
            cache.lookup(&path, &path).unwrap(),
            Lookup::Digest(HELLO_SHA256.into())
        );
        assert_eq!(cache.hashed(), 1, "lookups never hash");
    }

    #[test]
    fn a_rewritten_file_gets_its_new_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::write(&path, b"hello\n").unwrap();
        let cache = DigestCache::default();
        let before = cache.sha256(&path, &path).unwrap();
        std::fs::write(&path, b"other contents\n").unwrap();
        let after = cache.sha256(&path, &path).unwrap();
        assert_ne!(before, after);
        assert_eq!(cache.hashed(), 2);
    }

    #[test]
    fn a_file_over_one_gib_is_not_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let file = std::fs::File::create(&path).unwrap();
        // Sparse: takes no disk space.
        file.set_len(MAX_HASHED_SIZE + 1).unwrap();
        let cache = DigestCache::default();
        assert_eq!(cache.lookup(&path, &path).unwrap(), Lookup::TooLarge);
        assert_eq!(cache.sha256(&path, &path).unwrap(), None);
        assert_eq!(cache.hashed(), 0);
    }

    #[test]
    fn hex_is_lowercase_and_zero_padded() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }
}
