//! Store calls of many connections gathered into one: what sessions ask while a batch runs is
//! the next batch. A commit that changes a hundred thousand agents wakes as many sessions; each
//! asking the store on its own meant as many blocking-thread hand-offs and as many readers
//! queuing for a connection. Gathered, they are a few hundred bulk reads and group-committed
//! writes. A lone request is served at once, as before.

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

use crate::metrics::HubMetrics;
use crate::store::{HubStore, StoreError};

/// The most requests in one batch.
const MAX_BATCH: usize = 2_000;

type Reply<T> = oneshot::Sender<Result<T, String>>;

/// One bulk store call: the requests of a batch in, one answer per request out, in order.
pub(super) type BulkCall<Q, A> = fn(&dyn HubStore, Vec<Q>) -> Result<Vec<A>, StoreError>;

/// Requests of one kind waiting for the next batch.
pub(super) struct Batcher<Q, A> {
    waiting: Mutex<Vec<(Q, Reply<A>)>>,
    wake: Notify,
    call: BulkCall<Q, A>,
    /// The operation's name in the store latency metric.
    name: &'static str,
    metrics: Arc<HubMetrics>,
}

impl<Q: Send + 'static, A: Send + 'static> Batcher<Q, A> {
    pub(super) fn new(
        name: &'static str,
        metrics: Arc<HubMetrics>,
        call: BulkCall<Q, A>,
    ) -> Arc<Batcher<Q, A>> {
        Arc::new(Batcher {
            waiting: Mutex::new(Vec::new()),
            wake: Notify::new(),
            call,
            name,
            metrics,
        })
    }

    /// Asks, and waits for the batch holding the request to be answered.
    pub(super) async fn call(&self, request: Q) -> Result<A, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((request, reply));
        self.wake.notify_one();
        match answer.await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => Err(StoreError::Batch(error)),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Serves batches until the task is dropped.
    pub(super) async fn run(self: Arc<Self>, store: Arc<dyn HubStore>) {
        loop {
            self.wake.notified().await;
            loop {
                let batch: Vec<(Q, Reply<A>)> = {
                    let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                    let take = waiting.len().min(MAX_BATCH);
                    waiting.drain(..take).collect()
                };
                if batch.is_empty() {
                    break;
                }
                let (requests, replies): (Vec<Q>, Vec<Reply<A>>) = batch.into_iter().unzip();
                let (store, call, asked) = (store.clone(), self.call, replies.len());
                let (metrics, name) = (self.metrics.clone(), self.name);
                let answered = tokio::task::spawn_blocking(move || {
                    metrics.time(name, || call(&*store, requests))
                })
                .await
                .map_err(|error| format!("a store task failed: {error}"))
                .and_then(|result| result.map_err(|error| error.to_string()));
                match answered {
                    Ok(answers) if answers.len() == asked => {
                        for (reply, answer) in replies.into_iter().zip(answers) {
                            let _ = reply.send(Ok(answer));
                        }
                    }
                    Ok(answers) => {
                        let error = format!("the store answered {} of {asked}", answers.len());
                        for reply in replies {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                    Err(error) => {
                        for reply in replies {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
            }
        }
    }
}
