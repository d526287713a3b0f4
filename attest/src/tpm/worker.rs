//! One thread owns the TPM context (tss-esapi's `Context` is not `Send`, and TPM
//! commands block for milliseconds): callers send it closures and wait for the answer.
//! Called from a tokio multi-thread runtime, the wait runs in `block_in_place`, so the
//! worker thread's other tasks move elsewhere instead of stalling behind the TPM.

use std::sync::mpsc;
use std::thread::JoinHandle;

use super::{Tcti, Tpm, TpmInfo};
use crate::error::{AttestError, Result};

type Job = Box<dyn FnOnce(&mut Tpm) + Send>;

/// A handle to the TPM thread; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct TpmWorker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    tcti: Tcti,
    info: TpmInfo,
}

impl TpmWorker {
    /// Opens the TPM on a new thread. Fails like [`Tpm::open`] when nothing answers.
    pub fn spawn(tcti: &Tcti) -> Result<TpmWorker> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<TpmInfo>>();
        let t = tcti.clone();
        let thread = std::thread::Builder::new()
            .name("tpm".into())
            .spawn(move || {
                let mut tpm = match Tpm::open(&t) {
                    Ok(tpm) => {
                        let _ = ready_tx.send(Ok(tpm.info().clone()));
                        tpm
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = inbox.recv() {
                    job(&mut tpm);
                }
            })
            .map_err(|e| AttestError::TpmUnreachable {
                tcti: tcti.to_string(),
                message: format!("cannot start the TPM thread: {e}"),
            })?;
        let info = ready_rx.recv().map_err(|_| AttestError::TpmUnreachable {
            tcti: tcti.to_string(),
            message: "the TPM thread ended while opening".into(),
        })??;
        Ok(TpmWorker {
            jobs: Some(jobs),
            thread: Some(thread),
            tcti: tcti.clone(),
            info,
        })
    }

    pub fn info(&self) -> &TpmInfo {
        &self.info
    }

    /// Runs `f` on the TPM thread and waits for its result.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Tpm) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let gone = || AttestError::Tpm {
            command: "worker",
            tcti: self.tcti.to_string(),
            message: "the TPM thread has stopped".into(),
        };
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |tpm| {
            let _ = tx.send(f(tpm));
        });
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(job)
            .map_err(|_| gone())?;
        let wait = move || rx.recv();
        let answer = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        answer.map_err(|_| gone())?
    }
}

impl Drop for TpmWorker {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
