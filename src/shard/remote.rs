//! Cluster commands for the channels this shard owns: other nodes' presence joins, leaves and
//! syncs applied to its registry (announcing the members that change), a silent node's members
//! removed, and this shard's own members published for a node that (re)joined.

use std::sync::Arc;

use super::{presence, Shard};
use crate::cluster::Wire;
use crate::fanout::router::{partition, RemoteCmd};

impl Shard {
    /// What other nodes tell us (cluster mode).
    pub(super) fn remote(&self, cmd: RemoteCmd) {
        let router = &self.shared.router;
        match cmd {
            RemoteCmd::Join {
                node,
                app,
                channel,
                user_id,
                user_info,
                socket_id,
            } => {
                // The joining node already admitted the socket: no member limit here.
                let outcome = self.presence.borrow_mut().join(
                    app,
                    &channel,
                    &user_id,
                    user_info,
                    usize::MAX,
                    node,
                );
                if outcome == presence::Join::NewMember {
                    self.announce_added(app, channel, &user_id, socket_id);
                }
            }
            RemoteCmd::Leave {
                node,
                app,
                channel,
                user_id,
                socket_id,
            } => {
                if self
                    .presence
                    .borrow_mut()
                    .leave(app, &channel, &user_id, node)
                {
                    self.announce_removed(app, channel, &user_id, socket_id);
                }
            }
            RemoteCmd::Sync {
                node,
                part,
                parts,
                entries,
            } => {
                // Channels this shard owns that the sender's shard `part` covers: those in the
                // sync, and those where the node has members now (they may have none any more).
                let mut channels: Vec<(usize, Arc<str>)> = entries
                    .iter()
                    .filter(|(app, ch, _)| router.owner(*app, ch) == self.id)
                    .map(|(app, ch, _)| (*app, Arc::clone(ch)))
                    .collect();
                let known = self.presence.borrow().node_channels(node);
                for (app, ch) in known {
                    if partition(router.app_id(app), &ch, parts) == part {
                        channels.push((app, ch));
                    }
                }
                channels.sort();
                channels.dedup();
                for (app, ch) in channels {
                    let mine: Vec<_> = entries
                        .iter()
                        .filter(|(a, c, _)| *a == app && **c == *ch)
                        .map(|(_, _, e)| e.clone())
                        .collect();
                    self.set_node_members(app, ch, node, &mine);
                }
            }
            RemoteCmd::NodeGone { node } => {
                // Collect first: set_node_members needs the registry mutably.
                let channels = self.presence.borrow().node_channels(node);
                for (app, ch) in channels {
                    self.set_node_members(app, ch, node, &[]);
                }
            }
            RemoteCmd::PublishSync => self.publish_sync(),
        }
    }

    pub(super) fn set_node_members(
        &self,
        app: usize,
        channel: Arc<str>,
        node: u64,
        entries: &[presence::SyncEntry],
    ) {
        let (added, removed) = self
            .presence
            .borrow_mut()
            .set_node(app, &channel, node, entries);
        for u in removed {
            self.announce_removed(app, Arc::clone(&channel), &u, None);
        }
        for u in added {
            self.announce_added(app, Arc::clone(&channel), &u, None);
        }
    }

    /// Our members of the presence channels this shard owns, for the other nodes.
    pub(super) fn publish_sync(&self) {
        let Some(cluster) = &self.shared.cluster else {
            return;
        };
        let node = self.shared.node;
        let router = &self.shared.router;
        let registry = self.presence.borrow();
        let mut m = Vec::new();
        for (app, ch) in registry.node_channels(node) {
            for (u, info, n) in registry.node_entries(app, &ch, node) {
                m.push((
                    router.app_id(app).to_owned(),
                    ch.to_string(),
                    u.to_string(),
                    info.map(|i| i.to_string()),
                    n,
                ));
            }
        }
        cluster.publish(&Wire::Sync {
            node,
            part: self.id,
            parts: router.shards(),
            members: m,
        });
    }
}
