//! The objects a captioner references but does not own: API-key Secrets and the model PVC.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::{Api, Client, ResourceExt};
use sha2::{Digest, Sha256};

use crate::crd::VlmCaptioner;
use crate::error::{Error, Result};
use crate::status::{Problem, reason};

/// What the reconcile needs from the referenced objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inputs {
    /// sha256 (hex) of the referenced keys' values, in reference order.
    pub secret_hash: String,
    /// Everything missing, first reason first; `None` when the server can run.
    pub problem: Option<Problem>,
    /// The first referenced key's value: what nv-ingest sends, so what the probe and the
    /// published Secret use.
    pub first_key: Option<ApiKey>,
}

/// An API key value; `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Reads the referenced Secrets (each once) and the PVC. Only values of referenced keys are
/// hashed, so rotating an unrelated key in a shared Secret does not restart the server.
pub async fn observe(c: &VlmCaptioner, client: &Client, ns: &str) -> Result<Inputs> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut fetched: BTreeMap<&str, Option<Secret>> = BTreeMap::new();
    for r in &c.spec.auth.api_key_secret_refs {
        if !fetched.contains_key(r.name.as_str()) {
            let s = secrets
                .get_opt(&r.name)
                .await
                .map_err(|e| Error::kube("get", "Secret", &r.name, e))?;
            fetched.insert(&r.name, s);
        }
    }

    let mut problems = Vec::new();
    let mut values = Vec::new();
    for (i, r) in c.spec.auth.api_key_secret_refs.iter().enumerate() {
        let field = format!("spec.auth.apiKeySecretRefs[{i}]");
        match fetched.get(r.name.as_str()).and_then(Option::as_ref) {
            None => problems.push(Problem {
                reason: reason::SECRET_NOT_FOUND,
                message: format!(
                    "Secret {:?} ({field}) not found in namespace {ns:?}",
                    r.name
                ),
            }),
            Some(secret) => match secret.data.as_ref().and_then(|d| d.get(&r.key)) {
                None => problems.push(Problem {
                    reason: reason::SECRET_KEY_NOT_FOUND,
                    message: format!("Secret {:?} has no key {:?} ({field})", r.name, r.key),
                }),
                Some(v) => values.push((r.name.as_str(), r.key.as_str(), v.0.as_slice())),
            },
        }
    }

    if let Some(pvc) = &c.spec.model.pvc {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
        let found = pvcs
            .get_opt(&pvc.claim_name)
            .await
            .map_err(|e| Error::kube("get", "PersistentVolumeClaim", &pvc.claim_name, e))?;
        if found.is_none() {
            problems.push(Problem {
                reason: reason::PVC_NOT_FOUND,
                message: format!(
                    "PersistentVolumeClaim {:?} (spec.model.pvc.claimName) not found in namespace {ns:?}",
                    pvc.claim_name
                ),
            });
        }
    }

    // Only the first reference counts: nv-ingest sends one key. Missing or not UTF-8: none.
    let first_key = c.spec.auth.api_key_secret_refs.first().and_then(|r| {
        let v = fetched
            .get(r.name.as_str())?
            .as_ref()?
            .data
            .as_ref()?
            .get(&r.key)?;
        String::from_utf8(v.0.clone()).ok().map(ApiKey)
    });
    Ok(Inputs {
        first_key,
        secret_hash: hash_keys(&values),
        problem: merge(problems),
    })
}

/// sha256 over (name, key, value) triples; lengths are framed so no two inputs collide by concatenation.
pub fn hash_keys(values: &[(&str, &str, &[u8])]) -> String {
    let mut h = Sha256::new();
    for (name, key, value) in values {
        for part in [name.as_bytes(), key.as_bytes(), value] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    format!("{:x}", h.finalize())
}

pub(crate) fn merge(problems: Vec<Problem>) -> Option<Problem> {
    let reason = problems.first()?.reason;
    let message = problems
        .iter()
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    Some(Problem { reason, message })
}

/// Which captioners a Secret event should re-reconcile: those in its namespace that reference it.
pub fn references_secret(c: &VlmCaptioner, secret: &Secret) -> bool {
    c.namespace() == secret.namespace()
        && c.spec
            .auth
            .api_key_secret_refs
            .iter()
            .any(|r| r.name == secret.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_changes_with_any_referenced_value_and_is_framed() {
        let a = hash_keys(&[("ngc-api", "NGC_API_KEY", b"old")]);
        assert_eq!(a.len(), 64);
        assert_eq!(a, hash_keys(&[("ngc-api", "NGC_API_KEY", b"old")]));
        assert_ne!(a, hash_keys(&[("ngc-api", "NGC_API_KEY", b"new")]));
        assert_ne!(
            hash_keys(&[("ab", "c", b"")]),
            hash_keys(&[("a", "bc", b"")])
        );
    }

    #[test]
    fn problems_merge_with_the_first_reason() {
        let p = merge(vec![
            Problem {
                reason: reason::SECRET_NOT_FOUND,
                message: "a".into(),
            },
            Problem {
                reason: reason::PVC_NOT_FOUND,
                message: "b".into(),
            },
        ]);
        assert_eq!(
            p,
            Some(Problem {
                reason: reason::SECRET_NOT_FOUND,
                message: "a; b".into()
            })
        );
        assert_eq!(merge(vec![]), None);
    }
}
