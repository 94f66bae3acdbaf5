//! Why a reconcile failed, by the step that failed, each with a stable
//! label for `herald_operator_reconcile_failures_total{error="..."}` (as
//! kube-rs controller-rs labels its errors).
//!
//! An error is what a retry may cure (the API server or NATS did not
//! answer); what is wrong with the resource itself is a status, not an
//! error (see the table in [`super`]).

use herald_queue::QueueError;
use kube::runtime::finalizer;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the resource has no namespace")]
    NoNamespace,
    #[error("cannot read Namespace {namespace} for its users annotation: {source}")]
    ReadNamespace {
        namespace: String,
        source: kube::Error,
    },
    #[error("cannot read Secret {name}: {source}")]
    ReadSecret { name: String, source: kube::Error },
    #[error("cannot create Secret {name}: {source}")]
    CreateSecret { name: String, source: kube::Error },
    #[error("cannot patch the status: {0}")]
    PatchStatus(#[source] kube::Error),
    #[error("cannot add the finalizer: {0}")]
    AddFinalizer(#[source] kube::Error),
    #[error("cannot remove the finalizer: {0}")]
    RemoveFinalizer(#[source] kube::Error),
    /// The finalizer helper refused the object (no name) or its own patch.
    #[error("finalizer: {0}")]
    Finalizer(&'static str),
    #[error("cannot read the endpoint's health from NATS: {0}")]
    ReadHealth(#[source] QueueError),
    #[error("cannot write the endpoint record to NATS: {0}")]
    WriteRecord(#[source] QueueError),
    #[error("cannot remove the endpoint's old records from NATS: {0}")]
    RemoveRecords(#[source] QueueError),
}

impl Error {
    /// A short, stable name of the failed step for metrics and logs: it
    /// never carries a resource's name or an error's text, so the metric
    /// keeps a handful of series.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::NoNamespace => "no_namespace",
            Error::ReadNamespace { .. } => "namespace_read",
            Error::ReadSecret { .. } => "secret_read",
            Error::CreateSecret { .. } => "secret_create",
            Error::PatchStatus(_) => "status_patch",
            Error::AddFinalizer(_) => "finalizer_add",
            Error::RemoveFinalizer(_) => "finalizer_remove",
            Error::Finalizer(_) => "finalizer",
            Error::ReadHealth(_) => "health_read",
            Error::WriteRecord(_) => "record_write",
            Error::RemoveRecords(_) => "record_remove",
        }
    }

    /// The step that failed inside the finalizer helper: the reconciler's
    /// own error as it was, or the helper's patch.
    pub(super) fn from_finalizer(error: finalizer::Error<Error>) -> Self {
        match error {
            finalizer::Error::ApplyFailed(error) | finalizer::Error::CleanupFailed(error) => error,
            finalizer::Error::AddFinalizer(error) => Error::AddFinalizer(error),
            finalizer::Error::RemoveFinalizer(error) => Error::RemoveFinalizer(error),
            finalizer::Error::UnnamedObject => Error::Finalizer("the object has no name"),
            finalizer::Error::InvalidFinalizer => Error::Finalizer("invalid finalizer patch"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finalizer_helper_passes_the_failed_step_through() {
        let inner = finalizer::Error::ApplyFailed(Error::NoNamespace);
        assert_eq!(Error::from_finalizer(inner).metric_label(), "no_namespace");
        let inner = finalizer::Error::<Error>::UnnamedObject;
        assert_eq!(Error::from_finalizer(inner).metric_label(), "finalizer");
    }
}
