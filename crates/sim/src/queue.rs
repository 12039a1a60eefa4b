//! Timed events in virtual time.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::Micros;

/// A priority queue of events by time; events at the same time come out in insertion order,
/// so the order never depends on anything but the sequence of pushes.
#[derive(Debug)]
pub struct EventQueue<E> {
    heap: BinaryHeap<Reverse<(Micros, u64, Slot<E>)>>,
    seq: u64,
}

#[derive(Debug)]
struct Slot<E>(E);
impl<E> PartialEq for Slot<E> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl<E> Eq for Slot<E> {}
impl<E> PartialOrd for Slot<E> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<E> Ord for Slot<E> {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue { heap: BinaryHeap::new(), seq: 0 }
    }
}

impl<E> EventQueue<E> {
    /// Schedules `event` at `at`.
    pub fn push(&mut self, at: Micros, event: E) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, Slot(event))));
    }

    /// Time of the earliest event.
    pub fn peek_time(&self) -> Option<Micros> {
        self.heap.peek().map(|Reverse((t, _, _))| *t)
    }

    /// Removes the earliest event if it is due at or before `until`.
    pub fn pop_until(&mut self, until: Micros) -> Option<(Micros, E)> {
        if self.peek_time()? > until {
            return None;
        }
        self.heap.pop().map(|Reverse((t, _, Slot(e)))| (t, e))
    }

    /// Number of queued events.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// No events queued.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_order_then_insertion_order() {
        let mut q = EventQueue::default();
        q.push(5, "b");
        q.push(1, "a");
        q.push(5, "c");
        q.push(9, "d");
        assert_eq!(q.pop_until(5), Some((1, "a")));
        assert_eq!(q.pop_until(5), Some((5, "b")));
        assert_eq!(q.pop_until(5), Some((5, "c")));
        assert_eq!(q.pop_until(5), None);
        assert_eq!(q.len(), 1);
    }
}
