//! A lock built only on the clerk's versioned Get and Put.
//!
//! The lock key holds the owner's id, or "" when free. Acquire: read it; if free, Put our id
//! at the version read. A Put answering ErrMaybe is resolved by reading again: if the key
//! holds our id, the Put applied. Release: Put "" at the version read, only if we own it.

use sixfive_rpc::Transport;

use crate::clerk::{Clerk, KvClient};
use crate::store::KvError;

/// Pause between attempts while someone else holds the lock.
const BACKOFF_MICROS: u64 = 5_000;

/// Why a release was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// The lock is held by someone else, or by nobody.
    #[error("release refused: this client ({0}) does not hold the lock")]
    NotOwner(String),
    /// The store refused an operation.
    #[error("store error: {0}")]
    Store(#[from] KvError),
}

/// A lock named by a key.
pub struct Lock<T> {
    ck: Clerk<T>,
    key: String,
    owner: String,
}

impl<T: Transport> Lock<T> {
    /// A lock on `key` for the unique owner id `owner` (must not be empty).
    pub fn new(ck: Clerk<T>, key: &str, owner: &str) -> Lock<T> {
        assert!(!owner.is_empty(), "the empty owner id means 'free'");
        Lock { ck, key: key.into(), owner: owner.into() }
    }

    /// The clerk underneath (tests use it for their own keys).
    pub fn clerk(&mut self) -> &mut Clerk<T> {
        &mut self.ck
    }

    /// Waits until this owner holds the lock.
    pub async fn acquire(&mut self) -> Result<(), LockError> {
        loop {
            let (holder, version) = match self.ck.get(&self.key).await {
                Ok(v) => v,
                Err(KvError::NoKey) => (String::new(), 0),
                Err(e) => return Err(e.into()),
            };
            if holder == self.owner {
                return Ok(()); // an earlier Put of ours that answered ErrMaybe did apply
            }
            if holder.is_empty() {
                match self.ck.put(&self.key, &self.owner, version).await {
                    Ok(()) => return Ok(()),
                    Err(KvError::Version) | Err(KvError::Maybe) | Err(KvError::NoKey) => continue, // read again
                    Err(e) => return Err(e.into()),
                }
            }
            self.ck.transport().sleep(BACKOFF_MICROS).await;
        }
    }

    /// Releases the lock; refused if this owner does not hold it.
    pub async fn release(&mut self) -> Result<(), LockError> {
        loop {
            let (holder, version) = match self.ck.get(&self.key).await {
                Ok(v) => v,
                Err(KvError::NoKey) => (String::new(), 0),
                Err(e) => return Err(e.into()),
            };
            if holder != self.owner {
                return Err(LockError::NotOwner(self.owner.clone()));
            }
            match self.ck.put(&self.key, "", version).await {
                Ok(()) => return Ok(()),
                Err(KvError::Maybe) => {
                    // Applied if the key no longer holds our id (no one else writes it while
                    // we hold it, so our id there means the Put did not apply).
                    let (h, _) = self.ck.get(&self.key).await?;
                    if h != self.owner {
                        return Ok(());
                    }
                }
                Err(KvError::Version) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
