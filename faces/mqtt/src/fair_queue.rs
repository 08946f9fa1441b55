//! Inbound commands waiting for the gateway, fair between senders: each sender's commands stay in their
//! order (a pause then a resume), senders take turns, and both one sender's share and the whole queue are
//! bounded, so a flood from one client neither grows memory nor starves the others. Pure; the gateway owns
//! the I/O.

use std::collections::{BTreeMap, VecDeque};

/// Why an item was not queued; the item comes back so the caller can answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// This sender already has its share waiting.
    Sender,
    /// The whole queue is full.
    Queue,
}

#[derive(Debug)]
pub struct FairQueue<T> {
    per_sender: usize,
    total: usize,
    len: usize,
    waiting: BTreeMap<String, VecDeque<T>>,
    /// Senders with something waiting, in turn order.
    turns: VecDeque<String>,
}

impl<T> FairQueue<T> {
    pub fn new(per_sender: usize, total: usize) -> FairQueue<T> {
        FairQueue {
            per_sender: per_sender.max(1),
            total: total.max(1),
            len: 0,
            waiting: BTreeMap::new(),
            turns: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, sender: &str, item: T) -> Result<(), (Full, T)> {
        if self.len >= self.total {
            return Err((Full::Queue, item));
        }
        let queue = self.waiting.entry(sender.to_owned()).or_default();
        if queue.len() >= self.per_sender {
            return Err((Full::Sender, item));
        }
        if queue.is_empty() {
            self.turns.push_back(sender.to_owned());
        }
        queue.push_back(item);
        self.len += 1;
        Ok(())
    }

    /// The next item: the oldest of the sender whose turn it is.
    pub fn pop(&mut self) -> Option<T> {
        let sender = self.turns.pop_front()?;
        let queue = self.waiting.get_mut(&sender)?;
        let item = queue.pop_front();
        if queue.is_empty() {
            self.waiting.remove(&sender);
        } else {
            self.turns.push_back(sender);
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_take_turns_and_each_keeps_its_order() {
        let mut q = FairQueue::new(10, 100);
        for i in 0..4 {
            q.push("flood", format!("f{i}")).unwrap();
        }
        q.push("alice", "a0".to_owned()).unwrap();
        q.push("alice", "a1".to_owned()).unwrap();
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, ["f0", "a0", "f1", "a1", "f2", "f3"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_senders_share_and_the_whole_queue_are_bounded() {
        let mut q = FairQueue::new(2, 3);
        q.push("flood", 1).unwrap();
        q.push("flood", 2).unwrap();
        assert_eq!(q.push("flood", 3), Err((Full::Sender, 3)));
        q.push("bo", 4).unwrap();
        assert_eq!(q.push("alice", 5), Err((Full::Queue, 5)));
        assert_eq!(q.len(), 3);
        assert_eq!(q.pop(), Some(1));
        q.push("alice", 5).unwrap();
        let rest: Vec<i32> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(rest, [4, 2, 5]);
    }
}
