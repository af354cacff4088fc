//! The timer behind hyper's HTTP/1 header-read timeout (`--keep-alive-timeout`): coarse and cheap.
//!
//! hyper arms that timeout before reading every request head and drops it once the head is in,
//! so a keep-alive connection creates, registers and cancels one timer per request. With
//! hyper-util's `TokioTimer` that was ~2 000 instructions and one allocation per proxied request
//! (`benches/load/budget.sh`: 35 146 instructions with it, 33 185 without), about 6 % of
//! hubgate's work on a small request, all to enforce a deadline measured in seconds.
//!
//! Here a sleep is a deadline and, once it has been polled while not yet due, an entry in the
//! table of the thread that polled it. A ticker task on that thread wakes the due entries every
//! [`TICK`], so a timeout fires at most one tick late; the sleep removes its entry when dropped.
//! Registering and cancelling are a lock no other thread contends for (a table belongs to one
//! thread; only a task that moved between threads of a multi-threaded runtime touches another's)
//! and a slot reused from a free list.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often a thread's ticker looks for due sleeps: how late a timeout may fire.
pub const TICK: Duration = Duration::from_millis(250);

/// A [`hyper::rt::Timer`] whose sleeps are woken by their thread's ticker.
#[derive(Clone, Copy, Debug, Default)]
pub struct CoarseTimer;

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep {
            deadline,
            entry: None,
        })
    }
}

/// A deadline, and where it waits once polled early.
struct CoarseSleep {
    deadline: Instant,
    entry: Option<(Arc<Table>, usize)>,
}

impl hyper::rt::Sleep for CoarseSleep {}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        match &self.entry {
            Some((table, slot)) => table.rewake(*slot, cx.waker()),
            None => {
                let table = Table::here();
                let slot = table.insert(deadline, cx.waker().clone());
                self.entry = Some((table, slot));
            }
        }
        Poll::Pending
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        if let Some((table, slot)) = self.entry.take() {
            table.remove(slot);
        }
    }
}

/// One thread's waiting sleeps.
#[derive(Default)]
struct Table {
    inner: Mutex<Slots>,
    /// A ticker runs for this table (false again once the runtime it ran on is gone).
    ticking: AtomicBool,
}

#[derive(Default)]
struct Slots {
    /// A sleep's deadline and, until the ticker wakes it, its waker.
    entries: Vec<Option<(Instant, Option<Waker>)>>,
    free: Vec<usize>,
}

thread_local! {
    static HERE: std::cell::OnceCell<Arc<Table>> = const { std::cell::OnceCell::new() };
}

impl Table {
    /// This thread's table, with a ticker started on the runtime running here (a sleep is
    /// only ever polled inside one) unless one runs already.
    fn here() -> Arc<Table> {
        let table = HERE.with(|cell| cell.get_or_init(Arc::default).clone());
        if !table.ticking.load(Ordering::Acquire) && !table.ticking.swap(true, Ordering::AcqRel) {
            tokio::spawn(tick(Ticking(table.clone())));
        }
        table
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        // Nothing runs user code under this lock, so a poisoned one holds consistent slots.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, deadline: Instant, waker: Waker) -> usize {
        let mut slots = self.slots();
        let entry = Some((deadline, Some(waker)));
        match slots.free.pop() {
            Some(slot) => {
                slots.entries[slot] = entry;
                slot
            }
            None => {
                slots.entries.push(entry);
                slots.entries.len() - 1
            }
        }
    }

    /// A sleep polled again, perhaps from another task: the newest waker is the one to wake.
    fn rewake(&self, slot: usize, waker: &Waker) {
        if let Some(Some((_, stored))) = self.slots().entries.get_mut(slot) {
            match stored {
                Some(w) if w.will_wake(waker) => {}
                _ => *stored = Some(waker.clone()),
            }
        }
    }

    fn remove(&self, slot: usize) {
        let mut slots = self.slots();
        if let Some(entry) = slots.entries.get_mut(slot) {
            *entry = None;
            slots.free.push(slot);
        }
    }

    /// Wakes every sleep due by `now`, once.
    fn wake_due(&self, now: Instant) {
        let due: Vec<Waker> = self
            .slots()
            .entries
            .iter_mut()
            .flatten()
            .filter(|(deadline, _)| *deadline <= now)
            .filter_map(|(_, waker)| waker.take())
            .collect();
        // Woken outside the lock: a waker may run code that polls a sleep of this table.
        due.into_iter().for_each(Waker::wake);
    }
}

/// Wakes due sleeps every [`TICK`] until its runtime drops it.
async fn tick(ticking: Ticking) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        ticking.0.wake_due(Instant::now());
    }
}

/// The ticker's hold on its table: says when the ticker is gone, so the next sleep starts one.
struct Ticking(Arc<Table>);

impl Drop for Ticking {
    fn drop(&mut self) {
        self.0.ticking.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test]
    async fn a_sleep_ends_after_its_deadline_and_not_before() {
        let started = Instant::now();
        CoarseTimer.sleep(Duration::from_millis(300)).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_dropped_sleep_leaves_its_slot_for_the_next() {
        let first = CoarseTimer.sleep(Duration::from_secs(60));
        let waker = Waker::noop().clone();
        let mut cx = Context::from_waker(&waker);
        let mut first = first;
        assert!(first.as_mut().poll(&mut cx).is_pending());
        drop(first);
        let mut second = CoarseTimer.sleep(Duration::from_secs(60));
        assert!(second.as_mut().poll(&mut cx).is_pending());
        let table = Table::here();
        let slots = table.slots();
        assert_eq!(slots.entries.iter().flatten().count(), 1, "one live entry");
        assert_eq!(
            slots.entries.len(),
            1,
            "the dropped sleep's slot was reused"
        );
    }

    #[test]
    fn a_new_runtime_on_the_same_thread_gets_a_ticker_of_its_own() {
        for _ in 0..2 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let woken = rt.block_on(async {
                let sleep = CoarseTimer.sleep(Duration::from_millis(50));
                tokio::time::timeout(Duration::from_secs(10), sleep).await
            });
            assert!(woken.is_ok(), "no ticker woke the sleep");
        }
    }

    #[tokio::test]
    async fn a_sleep_already_due_is_ready_without_an_entry() {
        let mut sleep = CoarseTimer.sleep_until(Instant::now());
        let waker = Waker::noop().clone();
        assert!(sleep
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready());
    }
}
