//! Emptied vectors kept for reuse across threads: the export side's large blocks (span groups,
//! request buffers) go back to where the next one is made instead of to the allocator, which
//! keeps a freed block mapped for its purge delay (docs/BENCHMARKS.md, ninth session).

use std::sync::{Mutex, MutexGuard, PoisonError};

pub struct Pool<T> {
    kept: Mutex<Vec<Vec<T>>>,
    /// Vectors kept at most.
    most: usize,
    /// Room beyond this is not kept: a vector that grew past its usual size goes back to the
    /// allocator.
    max_capacity: usize,
}

impl<T> Pool<T> {
    pub fn new(most: usize, max_capacity: usize) -> Self {
        Self {
            kept: Mutex::default(),
            most,
            max_capacity,
        }
    }

    /// An emptied vector, if one is kept.
    pub fn take(&self) -> Option<Vec<T>> {
        self.lock().pop()
    }

    /// Empties `v` and keeps it, unless enough are kept or it has no room or too much.
    pub fn give(&self, mut v: Vec<T>) {
        v.clear();
        let mut kept = self.lock();
        if kept.len() < self.most && (1..=self.max_capacity).contains(&v.capacity()) {
            kept.push(v);
        }
    }

    /// Vectors kept now.
    pub fn kept(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Vec<T>>> {
        // Vectors are pushed and popped whole: a panic while holding it leaves nothing half
        // done.
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_emptied_vectors_of_usual_room_up_to_its_count() {
        let pool: Pool<u8> = Pool::new(2, 8);
        let v = vec![1u8; 4];
        let at = v.as_ptr();
        pool.give(v);
        let back = pool.take().unwrap();
        assert_eq!((back.as_ptr(), back.len(), back.capacity()), (at, 0, 4));
        // Too much room, or none: not kept.
        pool.give(Vec::with_capacity(9));
        pool.give(Vec::new());
        assert_eq!(pool.kept(), 0);
        for _ in 0..3 {
            pool.give(Vec::with_capacity(8));
        }
        assert_eq!(pool.kept(), 2);
    }
}
