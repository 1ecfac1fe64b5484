//! Events every connection hears of (a new configuration, the server stopping), and how
//! far the last one has reached.
//!
//! A push is every connection's streams answering one event. While it is under way, a
//! connection that has already answered it holds back reading its socket (its clients'
//! ACKs of what it sent), so that the connections still to answer get the CPU first:
//! otherwise, on a busy server, ACKs from the first half of the fleet are read between
//! the responses of the second half, and a push's tail grows with the fleet. Reads held
//! back resume as soon as every connection has answered, or `hold` after the push began,
//! whichever comes first. Newer events that come before every connection has answered
//! continue the push (each connection answers the latest); one that outlasted `hold` holds
//! nothing back until every connection has caught up, so that steady churn at a scale
//! where pushes overlap never keeps a client's frames waiting for long.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::Duration,
};

use tokio::sync::{watch, Notify};
// The runtime's clock (tests pause it).
use tokio::time::Instant;

/// What every connection is told: an event for its streams (a new configuration), or
/// that the server stops. (One channel for both: an idle connection waits on one thing,
/// and one wake-up per change.)
#[derive(Debug, Clone)]
pub enum Signal<E> {
    Event(E),
    Stop,
}

/// The sending side: one per server, shared by its connections.
#[derive(Debug)]
pub struct Broadcast<E> {
    tx: watch::Sender<Signal<E>>,
    progress: Arc<Progress>,
    hold: Duration,
}

/// How far the last event has reached.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    counts: Mutex<Counts>,
    /// Some connection has not answered the last event yet (a copy of `left > 0`, read
    /// without the lock).
    pushing: AtomicBool,
    /// Told when `pushing` falls.
    done: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Connections that hear of events.
    live: usize,
    /// Events published.
    generation: u64,
    /// Connections that have not answered the last event.
    left: usize,
    /// When the push under way began (its first event), while connections are left.
    since: Option<Instant>,
    /// The push under way outlasted the hold: reads are not held back until it ends.
    overdue: bool,
}

impl<E: Clone + Send + Sync + 'static> Broadcast<E> {
    /// Signals to connections, starting from `first` (which they are not told of: it is
    /// what a new connection starts from). Reads are held back for a push at most `hold`.
    pub fn new(first: E, hold: Duration) -> Self {
        Self { tx: watch::channel(Signal::Event(first)).0, progress: Arc::default(), hold }
    }

    /// Tells every connection of `event`.
    pub fn publish(&self, event: E) {
        let mut counts = self.progress.lock();
        counts.generation += 1;
        counts.left = counts.live;
        if counts.left == 0 {
            (counts.since, counts.overdue) = (None, false);
        } else {
            counts.since.get_or_insert_with(Instant::now);
        }
        self.progress.pushing.store(counts.left > 0 && !counts.overdue, Ordering::Release);
        // Under the lock: a connection counted here is one subscribed before this value.
        self.tx.send_replace(Signal::Event(event));
    }

    /// Tells every connection that the server stops.
    pub fn stop(&self) {
        self.tx.send_replace(Signal::Stop);
        self.progress.release(self.progress.lock());
    }

    /// A receiver of the signals as they come, for a transport that counts no progress
    /// (tonic's).
    pub fn receiver(&self) -> watch::Receiver<Signal<E>> {
        self.tx.subscribe()
    }

    /// A new connection's side: it hears of events published from now on.
    pub(crate) fn subscribe(&self) -> Listener<E> {
        let mut counts = self.progress.lock();
        counts.live += 1;
        let seen = counts.generation;
        let rx = self.tx.subscribe();
        drop(counts);
        Listener { rx: tokio_stream::wrappers::WatchStream::from_changes(rx), progress: self.progress.clone(), seen }
    }

    /// Whether connections still hold back their reads for the last push.
    pub fn pushing(&self) -> bool {
        self.progress.pushing.load(Ordering::Acquire)
    }

    /// Waits until the last push has held reads back for as long as it may, and then
    /// lets them go; `true` when it had to (some connection had not answered in time).
    /// Pending for ever while no push is under way: for a `select!` beside the events.
    pub async fn overdue(&self) -> bool {
        let since = {
            let counts = self.progress.lock();
            counts.since.filter(|_| !counts.overdue)
        };
        let Some(since) = since else { return std::future::pending().await };
        tokio::time::sleep_until(since + self.hold).await;
        let mut counts = self.progress.lock();
        // Not ended by every connection answering in the meantime.
        if counts.since != Some(since) || counts.overdue {
            return false;
        }
        counts.overdue = true;
        self.progress.release(counts);
        true
    }
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent whatever panicked while holding them.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads held back go on. The flag falls under the lock, so that it cannot undo a
    /// push published after this one ended; waiters are told after it.
    fn release(&self, counts: MutexGuard<'_, Counts>) {
        self.pushing.store(false, Ordering::Release);
        drop(counts);
        self.done.notify_waiters();
    }

    /// A connection that had answered generation `seen` answered the last one, or left:
    /// counted once per generation it had not answered yet.
    fn answered(&self, seen: &mut u64, leaving: bool) {
        let mut counts = self.lock();
        if leaving {
            counts.live = counts.live.saturating_sub(1);
        }
        if *seen >= counts.generation {
            return;
        }
        *seen = counts.generation;
        counts.left = counts.left.saturating_sub(1);
        if counts.left == 0 && counts.since.take().is_some() {
            counts.overdue = false;
            self.release(counts);
        }
    }
}

/// A connection's side of the signals.
pub(crate) struct Listener<E> {
    pub(crate) rx: tokio_stream::wrappers::WatchStream<Signal<E>>,
    progress: Arc<Progress>,
    /// The last generation this connection answered (or was started at).
    seen: u64,
}

impl<E> Listener<E> {
    /// The connection answered the signal it just took.
    pub(crate) fn answered(&mut self) {
        self.progress.answered(&mut self.seen, false);
    }

    /// Whether a push is under way.
    pub(crate) fn pushing(&self) -> bool {
        self.progress.pushing.load(Ordering::Acquire)
    }

    /// A wake-up for when the push ends: to be polled (registering it) before `pushing`
    /// is asked again, so that an end in between is not missed.
    pub(crate) fn when_done(&self) -> tokio::sync::futures::OwnedNotified {
        self.progress.done.clone().notified_owned()
    }
}

impl<E> Drop for Listener<E> {
    fn drop(&mut self) {
        self.progress.answered(&mut self.seen, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Waker};

    fn ready<F: Future>(f: std::pin::Pin<&mut F>) -> bool {
        f.poll(&mut Context::from_waker(Waker::noop())).is_ready()
    }

    /// A push is under way from its publication until every connection counted then has
    /// answered it or gone; whoever waits for its end is woken then, and not before.
    #[test]
    fn a_push_lasts_until_every_connection_counted_has_answered_or_left() {
        let b = Broadcast::new(0u32, Duration::from_secs(60));
        let (mut one, mut two, three) = (b.subscribe(), b.subscribe(), b.subscribe());
        assert!(!b.pushing(), "nothing published yet");
        b.publish(1);
        assert!(b.pushing() && one.pushing());
        let mut done = Box::pin(one.when_done());
        assert!(!ready(done.as_mut()), "registered, not ended");
        one.answered();
        one.answered();
        assert!(b.pushing(), "one connection answering twice counts once");
        two.answered();
        assert!(b.pushing() && !ready(done.as_mut()));
        drop(three);
        assert!(!b.pushing(), "the last one left without answering: the push has reached everyone");
        assert!(ready(done.as_mut()), "and whoever waited for its end is told");
    }

    /// A connection that came after a publication is not waited for; a later publication
    /// counts it. A newer event replaces an older one still under way: answering the
    /// newer one is all that is waited for.
    #[test]
    fn connections_are_counted_from_the_publication_after_they_came() {
        let b = Broadcast::new(0u32, Duration::from_secs(60));
        let mut old = b.subscribe();
        b.publish(1);
        let mut new = b.subscribe();
        old.answered();
        assert!(!b.pushing(), "the new connection was not there for event 1");
        b.publish(2);
        b.publish(3);
        old.answered();
        assert!(b.pushing());
        new.answered();
        assert!(!b.pushing(), "each answered the last event once");
    }

    /// The signals themselves come through unchanged, the last one first.
    #[tokio::test]
    async fn connections_hear_the_last_event_and_the_stop() {
        use tokio_stream::StreamExt;
        let b = Broadcast::new(0u32, Duration::from_secs(60));
        let mut l = b.subscribe();
        b.publish(1);
        b.publish(2);
        assert!(matches!(l.rx.next().await, Some(Signal::Event(2))));
        b.stop();
        assert!(!b.pushing(), "stopping ends the push");
        assert!(matches!(l.rx.next().await, Some(Signal::Stop)));
        let mut plain = b.receiver();
        assert!(matches!(*plain.borrow_and_update(), Signal::Stop));
    }

    /// A connection that never answers holds the others' reads back at most `hold`.
    #[tokio::test(start_paused = true)]
    async fn a_push_no_one_finishes_releases_reads_after_the_hold() {
        let b = Broadcast::new(0u32, Duration::from_millis(50));
        let (mut quick, mut stuck) = (b.subscribe(), b.subscribe());
        let mut idle = Box::pin(b.overdue());
        assert!(!ready(idle.as_mut()), "no push: never overdue");
        b.publish(1);
        quick.answered();
        let done = quick.when_done();
        let started = Instant::now();
        assert!(b.overdue().await, "the stuck connection kept the push going");
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        assert!(!b.pushing());
        done.await;
        stuck.answered();
        // Answered in time: not overdue, and the push ended when the last one answered.
        b.publish(2);
        assert!(b.pushing());
        let finished = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            quick.answered();
            drop(stuck);
        };
        let (overdue, ()) = tokio::join!(b.overdue(), finished);
        assert!(!overdue && !b.pushing());
    }

    /// Events that keep coming before every connection answered continue one push: the
    /// hold counts from its first event, and once it is up nothing is held back until
    /// every connection has answered the latest.
    #[tokio::test(start_paused = true)]
    async fn overlapping_events_hold_reads_back_once_until_every_connection_caught_up() {
        let b = Broadcast::new(0u32, Duration::from_millis(50));
        let (mut quick, mut slow) = (b.subscribe(), b.subscribe());
        let started = Instant::now();
        b.publish(1);
        quick.answered();
        tokio::time::sleep(Duration::from_millis(30)).await;
        b.publish(2);
        quick.answered();
        assert!(b.pushing(), "the slow connection has not answered yet");
        assert!(b.overdue().await);
        assert_eq!(started.elapsed(), Duration::from_millis(50), "counted from the first event");
        b.publish(3);
        assert!(!b.pushing(), "the push under way outlasted the hold: nothing is held back");
        let mut idle = Box::pin(b.overdue());
        assert!(!ready(idle.as_mut()), "and it is not overdue twice");
        quick.answered();
        slow.answered();
        b.publish(4);
        assert!(b.pushing(), "every connection caught up: the next push holds reads back again");
    }
}
