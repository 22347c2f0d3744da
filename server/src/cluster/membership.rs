//! Which node serves which partitions: liveness leases and takeovers,
//! with Redis as the arbiter and PostgreSQL following (see
//! [`super::partition`] for the fencing both engines apply).
//!
//! Each node process has a token (node id plus a random suffix) and keeps
//! a liveness key, `<prefix>alive:<token>`, alive with a TTL of one lease
//! (renewed every third of it). Each partition's owner key holds its
//! owner's token; a node takes a partition over with a compare-and-set
//! script in the partition's slot that also increments the partition's
//! epoch, then records the claim in PostgreSQL under that epoch (a late
//! claim with an older epoch changes nothing there).
//!
//! The rule in this build is active/standby: a node claims partitions only
//! when every partition is free or held by a node whose liveness key has
//! expired, and it serves only once it owns them all; a node that loses
//! any partition (it stalled past its lease and was taken over) stops.
//! Spreading partitions over several active nodes needs node-to-node
//! forwarding of requests, which this build does not have yet (issue #21).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::cluster::cluster_pipe;

use super::partition::{Ownership, PARTITIONS};
use super::postgres::PgDomains;
use super::redis_domains::{Conn, Keys};
use crate::store::StoreError;

/// Compare-and-set of a partition's owner; bumps and returns its epoch
/// (0: the owner was not the expected one).
const CLAIM: &str = "
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
return redis.call('INCR', KEYS[2])
";

/// Partitions a serving node re-reads per round besides partition 0.
const CHECK_WINDOW: u32 = 256;

/// Where this node stands after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It owns every partition and may serve.
    Serving,
    /// Another live node holds partitions; this one waits.
    Standby,
    /// It lost partitions it owned: another node took over. It must stop.
    Fenced,
}

/// This node's membership in the cluster.
pub struct Membership {
    conn: Conn,
    keys: Keys,
    ownership: Arc<Ownership>,
    lease: Duration,
    /// Where this node takes node links (the value of its liveness key).
    link_addr: String,
    /// The next window of partitions a serving node checks (see `step`).
    cursor: std::sync::atomic::AtomicU32,
    /// Set by [`Membership::resign`]: no step claims anything after it.
    resigned: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("token", &self.ownership.token())
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// Connects (its own connection, so a slow commit never delays a
    /// renewal).
    ///
    /// # Errors
    /// [`StoreError::Engine`] when the cluster cannot be reached.
    pub fn connect(
        urls: &str,
        prefix: &str,
        ownership: Arc<Ownership>,
        lease: Duration,
        link_addr: String,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            conn: Conn::open(urls, 1)?,
            keys: Keys::new(prefix),
            ownership,
            lease,
            link_addr,
            cursor: std::sync::atomic::AtomicU32::new(0),
            resigned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// How often [`Membership::step`] should run.
    #[must_use]
    pub fn period(&self) -> Duration {
        self.lease / 3
    }

    /// Renews this node's liveness key, which holds its link address.
    fn heartbeat(&self) -> Result<(), StoreError> {
        let ms = u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX);
        redis::cmd("SET")
            .arg(self.keys.alive(self.ownership.token()))
            .arg(&self.link_addr)
            .arg("PX")
            .arg(ms)
            .query::<()>(&mut *self.conn.lock())
            .map_err(|e| self.conn.fail(e))
    }

    /// Every partition's owner token.
    fn owners(&self) -> Result<Vec<Option<String>>, StoreError> {
        self.owners_of(0..PARTITIONS)
    }

    /// The owner tokens of `partitions`, in order.
    fn owners_of(
        &self,
        partitions: impl Iterator<Item = u32>,
    ) -> Result<Vec<Option<String>>, StoreError> {
        let mut pipe = cluster_pipe();
        for p in partitions {
            pipe.cmd("GET").arg(self.keys.owner(p));
        }
        pipe.query(&mut self.conn.lock())
            .map_err(|e| self.conn.fail(e))
    }

    /// The cheap round of a node that serves or waits, when nothing has
    /// changed: `None` if the full round is needed. Reading all 4,096
    /// owner keys every period on every node would grow Redis's load with
    /// the number of nodes; a takeover claims every partition, 0 among
    /// them, in one step, so partition 0 tells both who serves and whether
    /// this node lost, and a serving node also checks a window of
    /// [`CHECK_WINDOW`] partitions per round (all of them every
    /// `PARTITIONS / CHECK_WINDOW` rounds) in case one was taken alone.
    fn quick_step(&self, dead: Option<&str>) -> Result<Option<Standing>, StoreError> {
        let me = self.ownership.token();
        if self.ownership.owns_all() {
            let start = self.cursor.fetch_add(CHECK_WINDOW, Ordering::Relaxed) % PARTITIONS;
            let window = start..(start + CHECK_WINDOW).min(PARTITIONS);
            let owners = self.owners_of(std::iter::once(0).chain(window.clone()))?;
            if owners.iter().all(|o| o.as_deref() == Some(me)) {
                return Ok(Some(Standing::Serving));
            }
            return Ok(None);
        }
        if !self.ownership.owned().is_empty() {
            return Ok(None);
        }
        let owner = self.owners_of(std::iter::once(0))?.pop().flatten();
        match owner {
            Some(t) if t != me => {
                let alive = self.alive(&HashSet::from([t.as_str()]), dead)?;
                Ok(alive.contains(&t).then_some(Standing::Standby))
            }
            _ => Ok(None),
        }
    }

    /// Which of `tokens` have a live liveness key, leaving out the node
    /// whose link address is `dead` (presumed dead: its link refuses
    /// connections).
    fn alive(
        &self,
        tokens: &HashSet<&str>,
        dead: Option<&str>,
    ) -> Result<HashSet<String>, StoreError> {
        let tokens: Vec<&str> = tokens.iter().copied().collect();
        if tokens.is_empty() {
            return Ok(HashSet::new());
        }
        let mut pipe = cluster_pipe();
        for t in &tokens {
            pipe.cmd("GET").arg(self.keys.alive(t));
        }
        let found: Vec<Option<String>> = pipe
            .query(&mut self.conn.lock())
            .map_err(|e| self.conn.fail(e))?;
        Ok(tokens
            .iter()
            .zip(found)
            .filter(|(_, addr)| addr.is_some() && addr.as_deref() != dead)
            .map(|(t, _)| (*t).to_owned())
            .collect())
    }

    /// Compare-and-sets the owner of each `(partition, expected)` to `to`
    /// (`""`: no owner); returns the partitions set, with their new epochs.
    fn swap(&self, from: &[(u32, String)], to: &str) -> Result<Vec<(u32, u64)>, StoreError> {
        if from.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = cluster_pipe();
        for (p, expected) in from {
            pipe.cmd("EVAL")
                .arg(CLAIM)
                .arg(2)
                .arg(self.keys.owner(*p))
                .arg(format!("{}:epoch", self.keys.owner(*p)))
                .arg(expected)
                .arg(to);
        }
        let epochs: Vec<u64> = pipe
            .query(&mut self.conn.lock())
            .map_err(|e| self.conn.fail(e))?;
        Ok(from
            .iter()
            .zip(epochs)
            .filter(|(_, e)| *e > 0)
            .map(|((p, _), e)| (*p, e))
            .collect())
    }

    /// One round: renew the lease, notice lost partitions, take over when
    /// every partition is free or held by a dead node.
    ///
    /// # Errors
    /// [`StoreError::Engine`] when an engine fails (the caller retries on
    /// its next period; a node that cannot renew its lease for a whole
    /// lease is taken over and then finds itself fenced).
    pub fn step(&self, pg: &PgDomains) -> Result<Standing, StoreError> {
        self.step_presuming(pg, None)
    }

    /// As [`Membership::step`], counting the node whose link address is
    /// `dead` as dead even while its liveness key lasts: its link refused
    /// a connection, so its process is gone (the port is closed). If it is
    /// in fact alive, the engines fence it once this node takes over, and
    /// it stops; nothing acknowledged is lost either way.
    ///
    /// # Errors
    /// As [`Membership::step`].
    pub fn step_presuming(
        &self,
        pg: &PgDomains,
        dead: Option<&str>,
    ) -> Result<Standing, StoreError> {
        if self.resigned.load(Ordering::Acquire) {
            return Ok(Standing::Standby);
        }
        self.heartbeat()?;
        if let Some(standing) = self.quick_step(dead)? {
            return Ok(standing);
        }
        let owners = self.owners()?;
        let me = self.ownership.token();
        let mut lost = false;
        for (p, owner) in (0..PARTITIONS).zip(&owners) {
            if self.ownership.owns(p) && owner.as_deref() != Some(me) {
                self.ownership.set(p, false);
                lost = true;
            }
        }
        if lost {
            return Ok(Standing::Fenced);
        }
        if self.ownership.owns_all() {
            return Ok(Standing::Serving);
        }
        let others: HashSet<&str> = owners
            .iter()
            .flatten()
            .map(String::as_str)
            .filter(|t| *t != me)
            .collect();
        let alive = self.alive(&others, dead)?;
        if owners
            .iter()
            .flatten()
            .any(|t| t != me && alive.contains(t))
        {
            self.release_partial()?;
            return Ok(Standing::Standby);
        }
        let wanted: Vec<(u32, String)> = (0..PARTITIONS)
            .zip(&owners)
            .filter(|(p, _)| !self.ownership.owns(*p))
            .map(|(p, o)| (p, o.clone().unwrap_or_default()))
            .collect();
        if self.resigned.load(Ordering::Acquire) {
            return Ok(Standing::Standby);
        }
        let won = self.swap(&wanted, me)?;
        let recorded: HashSet<u32> = pg.claim(&won)?.into_iter().collect();
        for (p, _) in &won {
            self.ownership.set(*p, recorded.contains(p));
        }
        if self.ownership.owns_all() {
            tracing::info!(token = me, "took over every partition");
            Ok(Standing::Serving)
        } else {
            // Lost a race with another node starting: give back what was
            // won, so one of the two gets everything next time.
            self.release_partial()?;
            Ok(Standing::Standby)
        }
    }

    /// Gives back partitions held while not owning them all.
    fn release_partial(&self) -> Result<(), StoreError> {
        let held: Vec<(u32, String)> = self
            .ownership
            .owned()
            .into_iter()
            .map(|p| (p, self.ownership.token().to_owned()))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        self.swap(&held, "")?;
        for (p, _) in held {
            self.ownership.set(p, false);
        }
        Ok(())
    }

    /// At a clean shutdown: gives every partition back and ends the
    /// liveness key, so a standby takes over at once instead of after a
    /// lease.
    ///
    /// # Errors
    /// [`StoreError::Engine`] when Redis fails (the lease then expires).
    pub fn resign(&self) -> Result<(), StoreError> {
        self.resigned.store(true, Ordering::Release);
        let held: Vec<(u32, String)> = self
            .ownership
            .owned()
            .into_iter()
            .map(|p| (p, self.ownership.token().to_owned()))
            .collect();
        for (p, _) in &held {
            self.ownership.set(*p, false);
        }
        if !held.is_empty() {
            self.swap(&held, "")?;
        }
        redis::cmd("DEL")
            .arg(self.keys.alive(self.ownership.token()))
            .query::<()>(&mut *self.conn.lock())
            .map_err(|e| self.conn.fail(e))
    }

    /// The link address of the live node serving partition 0 (in this
    /// build, the node serving every partition), if there is one other
    /// than this node.
    ///
    /// # Errors
    /// [`StoreError::Engine`] when Redis fails.
    pub fn serving_link(&self) -> Result<Option<String>, StoreError> {
        let owner: Option<String> = redis::cmd("GET")
            .arg(self.keys.owner(0))
            .query(&mut *self.conn.lock())
            .map_err(|e| self.conn.fail(e))?;
        let Some(owner) = owner.filter(|o| o != self.ownership.token()) else {
            return Ok(None);
        };
        let addr: Option<String> = redis::cmd("GET")
            .arg(self.keys.alive(&owner))
            .query(&mut *self.conn.lock())
            .map_err(|e| self.conn.fail(e))?;
        // Nodes of earlier builds wrote "1": no address to link to.
        Ok(addr.filter(|a| a.parse::<std::net::SocketAddr>().is_ok()))
    }

    /// Tokens of the nodes owning partitions, with how many each owns
    /// (for `/cluster` and the tests).
    ///
    /// # Errors
    /// [`StoreError::Engine`] when Redis fails.
    pub fn owner_counts(&self) -> Result<HashMap<String, u32>, StoreError> {
        let mut counts = HashMap::new();
        for owner in self.owners()?.into_iter().flatten() {
            *counts.entry(owner).or_insert(0) += 1;
        }
        Ok(counts)
    }
}
