//! The app table, replaced at run time by a configuration reload (SIGHUP).
//!
//! Apps live in *slots*. A slot is given to an app id the first time this process sees it and is
//! never reused: connections, subscription indexes, caches and metrics key their state by slot,
//! so a reload never renumbers anything. A removed app keeps its slot, marked not live: its key
//! no longer connects and its id no longer answers the HTTP API, and its connections are closed
//! with 4003 by their shards. An app added again later gets its old slot back.
//!
//! Every shard holds its own copy of the current [`AppSet`] (an `Rc`, swapped by
//! `ShardCmd::Reload`), so reading an app's settings on the message path takes no lock and no
//! atomic. Threads outside the shards read [`Apps::current`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::config::App;

/// Most distinct app ids one process serves over its lifetime (slots are never reused).
pub const MAX_APP_SLOTS: usize = 1024;

/// One version of the app table.
#[derive(Clone, Debug)]
pub struct AppSet {
    /// Settings by slot (for a removed app: its last settings).
    slots: Vec<App>,
    /// Whether each slot's app is in the current configuration.
    live: Vec<bool>,
    by_key: HashMap<String, usize>,
    by_id: HashMap<String, usize>,
}

/// What a reload changed, by app id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

impl std::fmt::Display for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "added: {}; changed: {}; removed: {}",
            list(&self.added),
            list(&self.changed),
            list(&self.removed)
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReloadError {
    #[error("too many apps: this process has seen {0} distinct app ids (at most {MAX_APP_SLOTS}); restart it to start afresh")]
    TooManyApps(usize),
}

impl AppSet {
    /// The first table: one slot per app, in configuration order.
    pub fn new(apps: Vec<App>) -> AppSet {
        let live = vec![true; apps.len()];
        AppSet::build(apps, live)
    }

    fn build(slots: Vec<App>, live: Vec<bool>) -> AppSet {
        let mut by_key = HashMap::new();
        let mut by_id = HashMap::new();
        for (i, a) in slots.iter().enumerate().filter(|(i, _)| live[*i]) {
            by_key.insert(a.key.clone(), i);
            by_id.insert(a.id.clone(), i);
        }
        AppSet {
            slots,
            live,
            by_key,
            by_id,
        }
    }

    /// Number of slots (live or not).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// A slot's settings. Slots handed out by this set are always in range.
    pub fn get(&self, slot: usize) -> &App {
        &self.slots[slot]
    }

    pub fn is_live(&self, slot: usize) -> bool {
        self.live.get(slot).copied().unwrap_or(false)
    }

    /// The live app with this key.
    pub fn by_key(&self, key: &str) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    /// The live app with this id.
    pub fn by_id(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// Live apps with their slots.
    pub fn live(&self) -> impl Iterator<Item = (usize, &App)> {
        self.slots.iter().enumerate().filter(|(i, _)| self.live[*i])
    }

    /// The table for a new configuration's `apps` (already validated: unique ids and keys), and
    /// what changed. Known ids keep their slots; new ids get new ones.
    pub fn reloaded(&self, apps: Vec<App>) -> Result<(AppSet, Changes), ReloadError> {
        let mut slots = self.slots.clone();
        let mut live = vec![false; slots.len()];
        let mut changes = Changes::default();
        let old_slot: HashMap<&str, usize> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, a)| (a.id.as_str(), i))
            .collect();
        let mut added = Vec::new();
        for app in apps {
            match old_slot.get(app.id.as_str()) {
                Some(&i) => {
                    if !self.live[i] {
                        changes.added.push(app.id.clone());
                    } else if self.slots[i] != app {
                        changes.changed.push(app.id.clone());
                    }
                    live[i] = true;
                    slots[i] = app;
                }
                None => added.push(app),
            }
        }
        for (i, a) in self.slots.iter().enumerate() {
            if self.live[i] && !live[i] {
                changes.removed.push(a.id.clone());
            }
        }
        for app in added {
            if slots.len() >= MAX_APP_SLOTS {
                return Err(ReloadError::TooManyApps(slots.len() + 1));
            }
            changes.added.push(app.id.clone());
            slots.push(app);
            live.push(true);
        }
        Ok((AppSet::build(slots, live), changes))
    }
}

/// The current table, for threads outside the shards (webhooks, ingest, reload itself).
pub struct Apps {
    current: RwLock<Arc<AppSet>>,
    /// One reload at a time.
    reloading: Mutex<()>,
}

impl Apps {
    pub fn new(set: AppSet) -> Apps {
        Apps {
            current: RwLock::new(Arc::new(set)),
            reloading: Mutex::new(()),
        }
    }

    pub fn current(&self) -> Arc<AppSet> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Computes and installs the table for `apps`; `f` runs with the new table before the lock
    /// is released (to hand it to the shards in order).
    pub fn replace(
        &self,
        apps: Vec<App>,
        f: impl FnOnce(&Arc<AppSet>, &AppSet),
    ) -> Result<Changes, ReloadError> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current();
        let (next, changes) = old.reloaded(apps)?;
        let next = Arc::new(next);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&next);
        f(&next, &old);
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{App, ClientEvents};
    use std::time::Duration;

    fn app(id: &str, key: &str) -> App {
        App {
            id: id.into(),
            key: key.into(),
            secret: "s".into(),
            activity_timeout: 30,
            max_message_size: 10_000,
            max_connections: None,
            client_events: ClientEvents::Members,
            client_events_per_second: 10,
            max_pings_per_second: 10,
            max_presence_members: 100,
            max_user_info: 2048,
            cache_ttl: Duration::from_secs(1800),
            subscription_count: false,
            allowed_origins: vec!["*".into()],
            rate_limit: None,
            webhooks: vec![],
            max_channels: None,
            subscription_rate: crate::config::DEFAULT_SUBSCRIPTION_RATE,
            resume: vec![],
            compression: true,
            conflate: vec![],
        }
    }

    #[test]
    fn slots_are_stable_across_reloads() {
        let set = AppSet::new(vec![app("1", "k1"), app("2", "k2")]);
        let mut changed = app("2", "k2b");
        changed.activity_timeout = 60;
        let (next, ch) = set.reloaded(vec![changed, app("3", "k3")]).unwrap();
        assert_eq!(ch.added, vec!["3"]);
        assert_eq!(ch.changed, vec!["2"]);
        assert_eq!(ch.removed, vec!["1"]);
        assert_eq!(next.by_id("2"), Some(1));
        assert_eq!(next.by_key("k2"), None);
        assert_eq!(next.by_key("k2b"), Some(1));
        assert_eq!(next.by_id("3"), Some(2));
        assert_eq!(next.by_key("k1"), None);
        assert!(!next.is_live(0));
        assert_eq!(next.get(0).id, "1");
        // Coming back: the old slot.
        let (again, ch) = next.reloaded(vec![app("1", "k1")]).unwrap();
        assert_eq!(again.by_key("k1"), Some(0));
        assert_eq!(ch.added, vec!["1"]);
        assert_eq!(ch.removed, vec!["2", "3"]);
        assert_eq!(again.len(), 3);
        let (same, ch) = again.reloaded(vec![app("1", "k1")]).unwrap();
        assert!(ch.is_empty());
        assert_eq!(same.live().count(), 1);
    }
}
