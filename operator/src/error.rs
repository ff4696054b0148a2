/// A reconcile failure the operator retries with backoff. Problems the user must fix (a missing
/// Secret or PVC) are not errors: they become a `Degraded` condition.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{verb} {kind} {name:?}: {source}")]
    Kube {
        verb: &'static str,
        kind: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("VlmCaptioner {0:?} has no namespace")]
    MissingNamespace(String),
    #[error("spec.nvIngest.namespaceSelector: {0}")]
    Selector(String),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    pub fn kube(verb: &'static str, kind: &str, name: &str, source: kube::Error) -> Self {
        Error::Kube {
            verb,
            kind: kind.to_string(),
            name: name.to_string(),
            source: Box::new(source),
        }
    }

    /// Low-cardinality label for the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { verb, .. } => verb,
            Error::MissingNamespace(_) => "missing_namespace",
            Error::Selector(_) => "selector",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
