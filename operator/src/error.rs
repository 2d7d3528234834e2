//! The operator's one error type; each variant knows its metric label and whether a retry can help.

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or could not be reached.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    /// An object we build could not be serialised (a bug, not a cluster condition).
    #[error("cannot serialise {what}: {source}")]
    Serialize {
        /// The object.
        what: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// The watched object lacks something the API server always sets (namespace, uid).
    #[error("{object} has no {field}")]
    MissingField {
        /// `namespace/name` of the object.
        object: String,
        /// The field.
        field: &'static str,
    },
}

impl Error {
    /// The `kind` label of `vissl_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Serialize { .. } => "serialize",
            Error::MissingField { .. } => "missing_field",
        }
    }

    /// Whether requeueing the object can help (the API server may answer next time); the others
    /// need a fix in the object or the operator, so they are retried only slowly.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(status)) => {
                // 4xx other than conflicts and throttling will fail the same way again.
                status.code >= 500 || status.code == 409 || status.code == 429
            }
            Error::Kube(_) => true,
            Error::Serialize { .. } | Error::MissingField { .. } => false,
        }
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
