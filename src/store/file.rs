//! The embedded store: an append-only log of route batches in one directory on local disk.
//!
//! Each record is one line, `<crc32 in hex> <json>\n`. A batch is one record, so it is durable
//! whole or not at all; `write` returns only after `fsync`. A crash can leave a torn last record:
//! load stops at the first record whose line is incomplete or whose checksum does not match,
//! truncates the file there and carries on (logging what it dropped), never failing the start.
//! When the log has grown well past the live table it is rewritten (compacted) into a new file
//! that replaces the old one atomically with a rename.
//!
//! A lock file keeps two processes from appending to one log.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{Batch, Loaded, Store, StoreError, StoredChange, StoredRoute};

const LOG: &str = "routes.log";
const LOCK: &str = "lock";
/// Present once the hub has synced this directory's table (see [`Store::mark_synced`]).
const SYNCED: &str = "synced";

/// Compact once the log is this many times larger than the last compacted size (and at least
/// [`COMPACT_MIN_BYTES`]).
const COMPACT_RATIO: u64 = 4;
const COMPACT_MIN_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Record {
    Batch(Batch),
    Activity(HashMap<String, i64>),
}

struct Inner {
    file: File,
    /// Length of the log up to its last complete record: where the next append goes. A failed
    /// append is cut back to it, so garbage never sits in the middle of the log.
    good_len: u64,
    /// Size of the log right after the last compaction (or load).
    base_len: u64,
}

/// The file-backed store. Cheap to clone; clones share one log.
#[derive(Clone)]
pub struct FileStore(Arc<Shared>);

struct Shared {
    dir: PathBuf,
    /// Whether the log file was there before this process opened (and so created) it.
    log_existed: bool,
    inner: Mutex<Inner>,
    /// Held for the life of the store: the directory's advisory lock.
    _lock: File,
}

impl FileStore {
    /// Opens (creating if needed) the store in `dir` and takes its lock.
    ///
    /// # Errors
    /// When the directory cannot be created or opened, or another process holds the lock.
    pub fn open(dir: &Path) -> Result<FileStore, StoreError> {
        fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK))?;
        lock.try_lock().map_err(|_| {
            StoreError::Io(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another hubgate", dir.display()),
            ))
        })?;
        let log_existed = dir.join(LOG).exists();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(dir.join(LOG))?;
        // Anything else (a symlink to /dev/full or /dev/zero, a FIFO) would be read forever at
        // load, or take writes that are not kept.
        if !file.metadata()?.is_file() {
            return Err(StoreError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", dir.join(LOG).display()),
            )));
        }
        Ok(FileStore(Arc::new(Shared {
            dir: dir.to_owned(),
            log_existed,
            inner: Mutex::new(Inner {
                file,
                good_len: 0,
                base_len: 0,
            }),
            _lock: lock,
        })))
    }

    /// Rewrites the log as one batch holding `routes` at `version`, replacing the old log
    /// atomically.
    ///
    /// # Errors
    /// I/O errors; the old log stays in place and in use.
    fn compact_blocking(&self, routes: Vec<StoredRoute>, version: u64) -> Result<(), StoreError> {
        let mut inner = lock(&self.0.inner);
        let tmp = self.0.dir.join(format!("{LOG}.tmp"));
        let batch = Record::Batch(Batch {
            version,
            changes: routes.into_iter().map(StoredChange::Put).collect(),
        });
        let mut buf = Vec::new();
        encode(&batch, &mut buf)?;
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.0.dir.join(LOG))?;
        File::open(&self.0.dir)?.sync_all()?;
        inner.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(self.0.dir.join(LOG))?;
        inner.good_len = buf.len() as u64;
        inner.base_len = inner.good_len;
        tracing::info!(bytes = inner.good_len, "compacted the route log");
        Ok(())
    }

    fn load_blocking(&self) -> Result<Loaded, StoreError> {
        let mut inner = lock(&self.0.inner);
        let mut text = Vec::new();
        inner.file.seek(SeekFrom::Start(0))?;
        inner.file.read_to_end(&mut text)?;
        let synced = self.0.dir.join(SYNCED).exists();

        let mut routes: HashMap<String, StoredRoute> = HashMap::new();
        let mut version = 0;
        let mut good = 0usize;
        let mut damaged = false;
        while good < text.len() {
            let Some(end) = text[good..].iter().position(|b| *b == b'\n') else {
                tracing::warn!(
                    offset = good,
                    "route log ends in a torn record; ignoring it"
                );
                damaged = true;
                break;
            };
            let line = &text[good..good + end];
            match decode(line) {
                Some(Record::Batch(batch)) => {
                    version = version.max(batch.version);
                    for change in batch.changes {
                        match change {
                            StoredChange::Put(route) => {
                                routes.insert(route.key.clone(), route);
                            }
                            StoredChange::Del { key } => {
                                routes.remove(&key);
                            }
                        }
                    }
                }
                Some(Record::Activity(activity)) => {
                    for (key, ms) in activity {
                        if let Some(route) = routes.get_mut(&key) {
                            route.last_activity = route.last_activity.max(ms);
                        }
                    }
                }
                None => {
                    tracing::warn!(
                        offset = good,
                        dropped_bytes = text.len() - good,
                        "route log has a damaged record; keeping what precedes it"
                    );
                    damaged = true;
                    break;
                }
            }
            good += end + 1;
        }
        if good < text.len() {
            inner.file.set_len(good as u64)?;
            inner.file.sync_all()?;
        }
        inner.good_len = good as u64;
        inner.base_len = good as u64;
        drop(inner);
        let trusted = synced && self.0.log_existed && !damaged;
        if synced && !trusted {
            // The log the hub synced is gone or damaged: until the hub syncs again, nothing here
            // can be vouched for, even across further restarts.
            fs::remove_file(self.0.dir.join(SYNCED))?;
        }
        Ok(Loaded {
            routes: routes.into_values().collect(),
            version,
            trusted,
        })
    }

    fn mark_synced_blocking(&self) -> Result<(), StoreError> {
        File::create(self.0.dir.join(SYNCED))?.sync_all()?;
        File::open(&self.0.dir)?.sync_all()?;
        Ok(())
    }

    fn append(&self, records: &[Record], sync: bool) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        for r in records {
            encode(r, &mut buf)?;
        }
        let mut inner = lock(&self.0.inner);
        let good = inner.good_len;
        let result = (|| -> io::Result<()> {
            if inner.file.metadata()?.len() != good {
                inner.file.set_len(good)?;
            }
            inner.file.write_all(&buf)?;
            if sync {
                inner.file.sync_data()?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                inner.good_len = good + buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Cut back whatever part of the records made it, so the log stays clean.
                let _ = inner.file.set_len(good);
                Err(StoreError::Io(e))
            }
        }
    }
}

impl Store for FileStore {
    fn name(&self) -> &'static str {
        "file"
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        let this = self.clone();
        Box::pin(blocking(move || this.load_blocking()))
    }

    fn write(&self, batches: Vec<Batch>) -> BoxFuture<'_, Result<(), StoreError>> {
        let records: Vec<Record> = batches.into_iter().map(Record::Batch).collect();
        let this = self.clone();
        Box::pin(blocking(move || this.append(&records, true)))
    }

    fn write_activity(
        &self,
        activity: HashMap<String, i64>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            if activity.is_empty() {
                return Ok(());
            }
            let this = self.clone();
            blocking(move || this.append(&[Record::Activity(activity)], false)).await
        })
    }

    fn mark_synced(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        let this = self.clone();
        Box::pin(blocking(move || this.mark_synced_blocking()))
    }

    /// Whether the log has grown enough to be worth rewriting.
    fn wants_compaction(&self) -> bool {
        let inner = lock(&self.0.inner);
        inner.good_len > COMPACT_MIN_BYTES && inner.good_len > inner.base_len * COMPACT_RATIO
    }

    fn compact(
        &self,
        routes: Vec<StoredRoute>,
        version: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let this = self.clone();
        Box::pin(blocking(move || this.compact_blocking(routes, version)))
    }
}

/// Runs file I/O off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io(io::Error::other(e.to_string())))?
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn encode(record: &Record, out: &mut Vec<u8>) -> Result<(), StoreError> {
    let json = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let crc = crc32fast::hash(&json);
    out.extend_from_slice(format!("{crc:08x} ").as_bytes());
    out.extend_from_slice(&json);
    out.push(b'\n');
    Ok(())
}

fn decode(line: &[u8]) -> Option<Record> {
    let (crc, json) = (line.get(..8)?, line.get(9..)?);
    let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
    if line.get(8) != Some(&b' ') || crc32fast::hash(json) != crc {
        return None;
    }
    serde_json::from_slice(json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn put(key: &str, target: &str) -> StoredChange {
        let mut data = Map::new();
        data.insert("target".into(), target.into());
        StoredChange::Put(StoredRoute {
            key: key.into(),
            data,
            last_activity: 1,
        })
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn batches_survive_reopening_and_torn_tails_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        rt.block_on(async {
            let s = FileStore::open(dir.path()).unwrap();
            let first = s.load().await.unwrap();
            assert!(!first.trusted, "a first start cannot vouch for its table");
            s.write(vec![Batch {
                version: 1,
                changes: vec![put("/a", "http://a/")],
            }])
            .await
            .unwrap();
            s.write(vec![Batch {
                version: 2,
                changes: vec![
                    put("/b", "http://b/"),
                    StoredChange::Del { key: "/a".into() },
                ],
            }])
            .await
            .unwrap();
            s.write_activity(HashMap::from([("/b".to_owned(), 99)]))
                .await
                .unwrap();
        });
        // A crash in the middle of the next append leaves half a record.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG))
            .unwrap();
        f.write_all(b"0badc0de {\"batch\":{\"version\":3,\"chan")
            .unwrap();
        drop(f);
        rt.block_on(async {
            let s = FileStore::open(dir.path()).unwrap();
            let loaded = s.load().await.unwrap();
            assert_eq!(loaded.version, 2);
            assert_eq!(loaded.routes.len(), 1);
            assert_eq!(loaded.routes[0].key, "/b");
            assert_eq!(loaded.routes[0].last_activity, 99);
            assert!(
                !loaded.trusted,
                "damage means the hub should be asked to sync"
            );
            // The torn tail was cut: the next append and reload are clean.
            s.write(vec![Batch {
                version: 3,
                changes: vec![put("/c", "http://c/")],
            }])
            .await
            .unwrap();
            drop(s);
            let s = FileStore::open(dir.path()).unwrap();
            let loaded = s.load().await.unwrap();
            assert_eq!(loaded.version, 3);
            assert_eq!(loaded.routes.len(), 2);
            assert!(!loaded.trusted, "the hub never synced this store");
            s.mark_synced().await.unwrap();
            drop(s);
            let s = FileStore::open(dir.path()).unwrap();
            assert!(s.load().await.unwrap().trusted);
            drop(s);
            // A lost log is noticed even though the directory was synced once.
            fs::remove_file(dir.path().join(LOG)).unwrap();
            let s = FileStore::open(dir.path()).unwrap();
            assert!(!s.load().await.unwrap().trusted);
        });
    }

    #[test]
    fn a_second_process_cannot_open_the_same_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = FileStore::open(dir.path()).unwrap();
        assert!(FileStore::open(dir.path()).is_err());
    }

    #[test]
    fn compaction_keeps_the_table() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let s = FileStore::open(dir.path()).unwrap();
            s.load().await.unwrap();
            for v in 1..=50 {
                s.write(vec![Batch {
                    version: v,
                    changes: vec![put("/a", &format!("http://h{v}/"))],
                }])
                .await
                .unwrap();
            }
            let StoredChange::Put(last) = put("/a", "http://h50/") else {
                unreachable!()
            };
            s.compact(vec![last.clone()], 50).await.unwrap();
            s.write(vec![Batch {
                version: 51,
                changes: vec![put("/b", "http://b/")],
            }])
            .await
            .unwrap();
            drop(s);
            let s = FileStore::open(dir.path()).unwrap();
            let mut loaded = s.load().await.unwrap();
            loaded.routes.sort_by(|a, b| a.key.cmp(&b.key));
            assert_eq!(loaded.version, 51);
            assert_eq!(loaded.routes[0], last);
            assert_eq!(loaded.routes[1].key, "/b");
        });
    }
}
