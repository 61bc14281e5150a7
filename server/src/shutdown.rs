//! The server-wide shutdown signal.

use tokio::sync::watch;

/// Fires the shutdown signal.
#[derive(Debug)]
pub(crate) struct Trigger(watch::Sender<bool>);

/// Waits for the shutdown signal; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Shutdown(watch::Receiver<bool>);

/// A new, unfired signal.
pub(crate) fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Tells every waiter to stop.
    pub(crate) fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Completes once the signal has fired (or its trigger is gone).
    pub(crate) async fn wait(&mut self) {
        // An error means the trigger was dropped, which also means stop.
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// [`Shutdown::wait`] for callers that need an owned future.
    pub(crate) async fn wait_owned(mut self) {
        self.wait().await;
    }
}
