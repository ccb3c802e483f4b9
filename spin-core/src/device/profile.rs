//! Wall time per op of a training step, for `spin bench --train --profile`: where a step's time
//! goes, without `perf`. Recording is per thread: a thread that [`enable`]s it records the ops
//! it calls (a model's ops run on the caller's thread; their kernels' worker threads work inside
//! the op's time), so concurrent runs on other threads stay out of its table. While off, each
//! op call costs one thread-local read.
use std::cell::{Cell, RefCell};
use std::time::Instant;

/// What a recorded time covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pass {
    /// An op's forward computation.
    Forward,
    /// An op's backward computation (its call on dfdx's tape).
    Backward,
    /// A whole phase of a training step (forward and loss, backward, optimizer), ops included.
    Phase,
}

/// The summed wall time of one op (or phase) in one pass.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OpTime {
    /// The op's name, e.g. `linear`, or the phase's.
    pub op: &'static str,
    /// Forward, backward, or a whole phase.
    pub pass: Pass,
    /// Summed wall time in milliseconds.
    pub ms: f64,
    /// Calls summed.
    pub calls: u64,
}

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    static TIMES: RefCell<Vec<OpTime>> = const { RefCell::new(Vec::new()) };
}

/// Starts (or stops) recording on this thread.
pub fn enable(on: bool) {
    ENABLED.set(on);
}

/// The times this thread recorded since the last call, in the order first seen; clears them.
pub fn take() -> Vec<OpTime> {
    TIMES.take()
}

/// Runs `f`, adding its wall time to `op`'s in `pass` while this thread records.
pub fn timed<R>(op: &'static str, pass: Pass, f: impl FnOnce() -> R) -> R {
    if !ENABLED.get() {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    TIMES.with_borrow_mut(
        |times| match times.iter_mut().find(|t| t.op == op && t.pass == pass) {
            Some(t) => {
                t.ms += ms;
                t.calls += 1;
            }
            None => times.push(OpTime {
                op,
                pass,
                ms,
                calls: 1,
            }),
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing is recorded while off; on, calls and times add up per (op, pass) in first-seen
    /// order, `take` clears, and another thread's ops stay out. (The sleeps make each time at
    /// least 2 ms.)
    #[test]
    fn records_only_while_enabled_and_only_this_thread() {
        assert_eq!(timed("a", Pass::Forward, || 7), 7);
        assert!(take().is_empty());
        enable(true);
        let sleep = || std::thread::sleep(std::time::Duration::from_millis(2));
        timed("a", Pass::Forward, sleep);
        timed("b", Pass::Backward, sleep);
        std::thread::spawn(|| timed("c", Pass::Forward, || ()))
            .join()
            .unwrap();
        timed("a", Pass::Forward, sleep);
        timed("a", Pass::Backward, || ());
        enable(false);
        timed("d", Pass::Forward, || ());
        let got = take();
        let keys: Vec<_> = got.iter().map(|t| (t.op, t.pass, t.calls)).collect();
        assert_eq!(
            keys,
            [
                ("a", Pass::Forward, 2),
                ("b", Pass::Backward, 1),
                ("a", Pass::Backward, 1)
            ]
        );
        assert!(got[0].ms >= 4.0 && got[1].ms >= 2.0, "{got:?}");
        assert!(take().is_empty());
    }
}
