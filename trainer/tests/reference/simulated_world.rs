//! Ranks of a simulated world as threads of one process: each gets a [`LossContext`] whose
//! in-place sum and gather meet the other threads at a barrier, so losses with collectives
//! (Sinkhorn sums, k-means statistics, gathered assignments) run as they would on W processes.
//! The gather keeps no autograd graph (the method tests gather only statistics and indices).
//! Included by the method tests with `#[path]`.

use std::sync::{Arc, Barrier, Mutex};

use tch::Tensor;
use vissl_trainer::losses::LossContext;

struct Meeting {
    barrier: Barrier,
    slots: Mutex<Vec<Option<Tensor>>>,
}

impl Meeting {
    /// Every rank deposits `t`, then reads all deposits in rank order.
    fn exchange(&self, rank: usize, t: &Tensor) -> Vec<Tensor> {
        self.slots.lock().expect("slots")[rank] = Some(t.detach().copy());
        self.barrier.wait();
        let all: Vec<Tensor> = self
            .slots
            .lock()
            .expect("slots")
            .iter()
            .map(|s| s.as_ref().expect("every rank deposited").copy())
            .collect();
        // Nobody deposits the next collective's tensor before everyone has read this one.
        self.barrier.wait();
        all
    }
}

/// Runs `body(rank, context)` on `world` threads and returns the results in rank order.
pub fn run_world<R, F>(world: usize, body: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn(usize, LossContext) -> R + Send + Sync + 'static,
{
    let meeting = Arc::new(Meeting {
        barrier: Barrier::new(world),
        slots: Mutex::new((0..world).map(|_| None).collect()),
    });
    let body = Arc::new(body);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (sum_meeting, gather_meeting) = (meeting.clone(), meeting.clone());
            let body = body.clone();
            std::thread::spawn(move || {
                let ctx = LossContext::distributed(
                    rank,
                    world,
                    Box::new(move |t: &Tensor| {
                        let parts = gather_meeting.exchange(rank, t);
                        Ok(Tensor::cat(&parts, 0))
                    }),
                )
                .with_all_reduce_sum(Box::new(move |t: &Tensor| {
                    let parts = sum_meeting.exchange(rank, t);
                    let total = parts.iter().skip(1).fold(parts[0].copy(), |acc, p| acc + p);
                    t.shallow_clone().copy_(&total);
                    Ok(())
                }));
                body(rank, ctx)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect()
}
