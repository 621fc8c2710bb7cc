//! An in-memory `Store` for the allocator's unit tests (the reference's `FakeStore`), with a
//! real lock so threads serialize on it as plugins do on the file store, a count of locks
//! taken, and one injectable reservation failure to exercise rollback on store errors.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use twill_common::cni::CniError;

use super::store::{LockedStore, Reservation, Store};

#[derive(Debug, Default)]
pub struct State {
    /// Address → (container ID, ifname).
    ips: BTreeMap<IpAddr, (String, String)>,
    last: BTreeMap<usize, IpAddr>,
    locks: usize,
    fail_reserve: Option<IpAddr>,
}

#[derive(Debug, Default)]
pub struct MemStore {
    state: Mutex<State>,
}

pub struct MemGuard<'a>(MutexGuard<'a, State>);

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread poisons the lock; the data is still what it wrote.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many times the lock was taken.
    pub fn locks(&self) -> usize {
        self.state().locks
    }

    /// Makes reserving `ip` fail with an I/O-like error.
    pub fn fail_reserve_of(&self, ip: IpAddr) {
        self.state().fail_reserve = Some(ip);
    }
}

impl Store for MemStore {
    type Guard<'a> = MemGuard<'a>;

    fn lock(&self) -> Result<MemGuard<'_>, CniError> {
        let mut s = self.state();
        s.locks += 1;
        Ok(MemGuard(s))
    }
}

impl LockedStore for MemGuard<'_> {
    fn reserve(
        &mut self,
        ip: IpAddr,
        id: &str,
        ifname: &str,
        set_idx: usize,
    ) -> Result<bool, CniError> {
        if self.0.fail_reserve == Some(ip) {
            return Err(CniError::internal(format!("create {ip}: injected failure")));
        }
        if self.0.ips.contains_key(&ip) {
            return Ok(false);
        }
        self.0
            .ips
            .insert(ip, (id.trim().to_string(), ifname.to_string()));
        self.0.last.insert(set_idx, ip);
        Ok(true)
    }

    fn last_reserved(&self, set_idx: usize) -> Option<IpAddr> {
        self.0.last.get(&set_idx).copied()
    }

    fn list(&self) -> Result<Vec<Reservation>, CniError> {
        Ok(self
            .0
            .ips
            .iter()
            .map(|(ip, (id, ifname))| Reservation {
                ip: *ip,
                container_id: id.clone(),
                ifname: ifname.clone(),
            })
            .collect())
    }

    fn release_ip(&mut self, ip: IpAddr) -> Result<(), CniError> {
        self.0.ips.remove(&ip);
        Ok(())
    }
}
