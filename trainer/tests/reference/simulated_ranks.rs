//! A world of ranks simulated in one process for the method tests: each rank's gather returns every
//! rank's tensor (the caller's own slice where the rank's loss passed it, so gradients reach every
//! rank's inputs as the real gather's summing backward does), and all-reduce sums are exact: every
//! rank runs twice, first to record what it contributes to each all-reduce, then with the other
//! ranks' recorded contributions added in.

use std::sync::{Arc, Mutex};
use tch::Tensor;
use vissl_trainer::losses::LossContext;

type Records = Arc<Mutex<Vec<Vec<Tensor>>>>;

fn context(rank: usize, others: Vec<Tensor>, records: Records, replay: bool) -> LossContext {
    let world = others.len();
    let calls = Arc::new(Mutex::new(0usize));
    LossContext::distributed(
        rank,
        world,
        Box::new(move |local: &Tensor| {
            let parts: Vec<Tensor> = others
                .iter()
                .enumerate()
                .map(|(r, t)| {
                    if r == rank {
                        local.shallow_clone()
                    } else {
                        t.shallow_clone()
                    }
                })
                .collect();
            Tensor::f_cat(&parts, 0).map_err(|e| e.to_string())
        }),
    )
    .with_all_reduce_sum(Box::new(move |t: &Tensor| {
        let mut records = records.lock().map_err(|e| e.to_string())?;
        let mut call = calls.lock().map_err(|e| e.to_string())?;
        if replay {
            let _guard = tch::no_grad_guard();
            for (r, recorded) in records.iter().enumerate() {
                if r != rank {
                    let other = recorded
                        .get(*call)
                        .ok_or_else(|| format!("rank {r} made fewer all-reduce calls"))?;
                    let _ = t.shallow_clone().f_add_(other).map_err(|e| e.to_string())?;
                }
            }
        } else {
            records[rank].push(t.detach().copy());
        }
        *call += 1;
        Ok(())
    }))
}

/// Runs `step(rank, ctx)` for every rank of a world whose gathered tensors are `gathered` (one per
/// rank) and returns each rank's result from the exact (second) pass.
pub fn run_ranks<T>(gathered: &[Tensor], mut step: impl FnMut(usize, LossContext) -> T) -> Vec<T> {
    let world = gathered.len();
    let records: Records = Arc::new(Mutex::new((0..world).map(|_| Vec::new()).collect()));
    let others = || {
        gathered
            .iter()
            .map(Tensor::shallow_clone)
            .collect::<Vec<_>>()
    };
    for rank in 0..world {
        drop(step(rank, context(rank, others(), records.clone(), false)));
    }
    (0..world)
        .map(|rank| step(rank, context(rank, others(), records.clone(), true)))
        .collect()
}
