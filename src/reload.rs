//! Hot reload (SPEC §8): watch files and SIGHUP, build a new snapshot off
//! the request path, publish it with one store.
//!
//! Owns *when* to reload and what to do with the result; *how* to build a
//! snapshot is [`crate::config`], and publishing is [`Gateway::publish`].
//! A generation that fails anywhere is discarded whole: the previous one
//! keeps serving, the error is logged with file, line and key, and
//! `scopegate_config_reloads_total{result="failure"}` counts it.
//!
//! Watching is done on the *directories* of every file the snapshot was
//! built from, not on the files: in-place writes, write-then-rename and the
//! Kubernetes ConfigMap/Secret `..data` symlink swap all show up as events
//! in those directories, while a watch on a file's inode would be lost at
//! the first rename. Events are debounced; a reload whose files all hash as
//! before publishes nothing (an unrelated file in the same folder changed).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{self, ConfigErrors, Snapshot};
use crate::proxy::Gateway;

/// Quiet time after the last file event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// Longest a burst of events can postpone a reload.
pub const MAX_DELAY: Duration = Duration::from_millis(1000);

/// Environment lookup usable from the reload task.
pub type SharedEnv = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// A new generation was published.
    Published(u64),
    /// Every file hashed as before; nothing was published.
    Unchanged,
}

/// Carry the TLS sessions clients can resume from `old` into `new` when
/// `new` serves the same certificate and key, byte for byte: a reload that
/// edits PATs or routes should not send every returning client through a
/// full handshake. A changed certificate or key keeps `new`'s empty cache,
/// so no session made under the old one is resumed.
fn carry_tls_sessions(old: &Snapshot, new: &mut Snapshot) {
    let hash = |s: &Snapshot, p: &Path| {
        s.files
            .iter()
            .find(|f| f.path == p)
            .map(|f| f.sha256.clone())
    };
    let Some(config) = old.tls.as_ref().zip(new.tls.as_ref()).and_then(|(o, n)| {
        let same = [(&o.files.cert, &n.files.cert), (&o.files.key, &n.files.key)]
            .into_iter()
            .all(|(a, b)| hash(old, a).is_some_and(|h| Some(h) == hash(new, b)));
        same.then(|| {
            let mut c = (*n.config).clone();
            c.session_storage = o.config.session_storage.clone();
            Arc::new(c)
        })
    }) else {
        return;
    };
    if let Some(t) = new.tls.as_mut() {
        t.config = config;
    }
}

/// Reloads the gateway's configuration from `path`.
pub struct Reloader {
    gw: Arc<Gateway>,
    path: PathBuf,
    env: SharedEnv,
}

/// Whether two snapshots were built from byte-identical files.
fn same_files(a: &Snapshot, b: &Snapshot) -> bool {
    a.files.len() == b.files.len()
        && a.files
            .iter()
            .zip(&b.files)
            .all(|(x, y)| x.path == y.path && x.sha256 == y.sha256)
}

impl Reloader {
    pub fn new(gw: Arc<Gateway>, path: PathBuf, env: SharedEnv) -> Reloader {
        Reloader { gw, path, env }
    }

    /// Build and publish the next generation now. `force` publishes even
    /// when no file changed (SIGHUP). The build runs on a blocking thread:
    /// a large PAT file must not stall the request workers.
    pub async fn reload(&self, force: bool) -> Result<Reloaded, ConfigErrors> {
        // An event in a watched folder is often about another file (a log,
        // an editor's swap file). Hashing the serving generation's files is
        // ~100x cheaper than parsing them (100k PATs: ~0.5 s and ~60 MB
        // transient, measured in bench/memory.sh), so parse only when one
        // of them changed.
        if !force {
            let files = self.gw.current().snapshot.files.clone();
            let unchanged = tokio::task::spawn_blocking(move || config::files_unchanged(&files))
                .await
                .unwrap_or(false);
            if unchanged {
                return Ok(Reloaded::Unchanged);
            }
        }
        let path = self.path.clone();
        let env = self.env.clone();
        let built = tokio::task::spawn_blocking(move || config::load(&path, &*env))
            .await
            .unwrap_or_else(|e| {
                Err(ConfigErrors(vec![config::ConfigError::Io {
                    file: self.path.clone(),
                    message: format!("reload task failed: {e}"),
                }]))
            });
        let mut snapshot = match built {
            Ok(s) => s,
            Err(e) => {
                self.gw.record_failure(&e.to_string());
                tracing::error!(errors = %e, "configuration reload failed; the previous generation keeps serving");
                return Err(e);
            }
        };
        let current = self.gw.current();
        if !force && same_files(&current.snapshot, &snapshot) {
            return Ok(Reloaded::Unchanged);
        }
        if snapshot.listen_addr != current.snapshot.listen_addr
            || snapshot.admin_addr != current.snapshot.admin_addr
        {
            tracing::warn!(
                "listen.addr and admin.addr are read at start only; restart to move the listeners"
            );
        }
        for w in &snapshot.warnings {
            tracing::warn!(warning = %w, "configuration warning");
        }
        carry_tls_sessions(&current.snapshot, &mut snapshot);
        match self.gw.publish(snapshot) {
            Ok(n) => {
                tracing::info!(generation = n, "configuration reloaded");
                Ok(Reloaded::Published(n))
            }
            Err(e) => {
                let errors = ConfigErrors(vec![config::ConfigError::Io {
                    file: self.path.clone(),
                    message: e,
                }]);
                self.gw.record_failure(&errors.to_string());
                tracing::error!(errors = %errors, "configuration reload failed; the previous generation keeps serving");
                Err(errors)
            }
        }
    }

    /// The directories to watch for the serving generation.
    fn watch_dirs(&self) -> BTreeSet<PathBuf> {
        let g = self.gw.current();
        let mut dirs: BTreeSet<PathBuf> = g
            .snapshot
            .files
            .iter()
            .filter_map(|f| f.path.parent().map(dir_or_dot))
            .collect();
        if let Some(p) = self.path.parent() {
            dirs.insert(dir_or_dot(p));
        }
        dirs
    }

    /// Install the file watches now, then return the task that reloads on
    /// change and on every message from `force` (SIGHUP), until `force`
    /// closes. Watching starts before this returns, so no change made after
    /// it can be missed.
    pub fn start(
        self,
        mut force: mpsc::Receiver<()>,
    ) -> impl std::future::Future<Output = ()> + Send {
        let (tx, mut events) = mpsc::unbounded_channel::<()>();
        let mut watcher = match self.watcher(tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %e, "cannot watch configuration files; only SIGHUP reloads");
                None
            }
        };
        async move {
            loop {
                tokio::select! {
                    f = force.recv() => {
                        if f.is_none() {
                            return;
                        }
                        let _ = self.reload(true).await;
                    }
                    e = events.recv() => {
                        if e.is_none() {
                            return;
                        }
                        // Debounce: wait for a quiet period, bounded.
                        let deadline = tokio::time::Instant::now() + MAX_DELAY;
                        loop {
                            let quiet = tokio::time::sleep(DEBOUNCE);
                            tokio::select! {
                                more = events.recv() => if more.is_none() { return },
                                _ = quiet => break,
                            }
                            if tokio::time::Instant::now() >= deadline {
                                break;
                            }
                        }
                        let _ = self.reload(false).await;
                    }
                }
                // The set of files (and a ConfigMap's resolved folders) may have
                // changed: watch afresh.
                if let Some(w) = watcher.as_mut() {
                    self.rewatch(w);
                }
            }
        }
    }

    fn watcher(&self, tx: mpsc::UnboundedSender<()>) -> notify::Result<Watches> {
        let w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && !matches!(ev.kind, notify::EventKind::Access(_))
            {
                let _ = tx.send(());
            }
        })?;
        let mut watches = Watches {
            watcher: w,
            watched: std::collections::BTreeMap::new(),
        };
        for d in self.watch_dirs() {
            let canonical = std::fs::canonicalize(&d).unwrap_or_else(|_| d.clone());
            watches.watcher.watch(&d, RecursiveMode::NonRecursive)?;
            watches.watched.insert(d, canonical);
        }
        Ok(watches)
    }

    /// Bring the watches in line with the serving generation without ever
    /// dropping a watch that is still needed: a gap would lose an edit made
    /// right after a reload. A folder whose resolved path changed (a
    /// symlinked folder swapped by a ConfigMap update) is watched anew, the
    /// new watch added before the old one is removed.
    fn rewatch(&self, w: &mut Watches) {
        let wanted = self.watch_dirs();
        for d in &wanted {
            let canonical = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
            match w.watched.get(d) {
                Some(old) if *old == canonical => {}
                Some(_) => {
                    // inotify follows the folder it resolved at watch time:
                    // re-watching the path picks up the new target.
                    if let Err(e) = w.watcher.watch(d, RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %d.display(), error = %e, "cannot watch folder");
                    }
                    w.watched.insert(d.clone(), canonical);
                }
                None => match w.watcher.watch(d, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        w.watched.insert(d.clone(), canonical);
                    }
                    Err(e) => tracing::warn!(dir = %d.display(), error = %e, "cannot watch folder"),
                },
            }
        }
        let stale: Vec<PathBuf> = w
            .watched
            .keys()
            .filter(|d| !wanted.contains(*d))
            .cloned()
            .collect();
        for d in stale {
            let _ = w.watcher.unwatch(&d);
            w.watched.remove(&d);
        }
    }
}

/// The watcher and what it watches (folder → its resolved path when watched).
struct Watches {
    watcher: notify::RecommendedWatcher,
    watched: std::collections::BTreeMap<PathBuf, PathBuf>,
}

fn dir_or_dot(p: &Path) -> PathBuf {
    if p.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        p.to_path_buf()
    }
}

/// Start the reload task: file watching plus a channel for forced reloads.
/// Dropping the returned sender stops the task.
pub fn spawn(gw: Arc<Gateway>, path: PathBuf, env: SharedEnv) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel(4);
    let reloader = Reloader::new(gw, path, env);
    tokio::spawn(reloader.start(rx));
    tx
}
