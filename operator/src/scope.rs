//! Where the operator may read and write: every namespace (cluster-wide RBAC), or only the
//! namespaces it watches (a Role in each). The nv-ingest wiring must stay inside it.

use std::collections::BTreeSet;
use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    #[default]
    Cluster,
    /// Sorted and never empty (no namespaces means cluster-wide).
    Namespaces(BTreeSet<String>),
}

impl Scope {
    /// The scope of `--namespace` values: blanks dropped, none left means cluster-wide.
    pub fn from_namespaces<I, S>(namespaces: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let set: BTreeSet<String> = namespaces
            .into_iter()
            .map(|n| n.as_ref().trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        if set.is_empty() {
            Scope::Cluster
        } else {
            Scope::Namespaces(set)
        }
    }

    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Namespaces(set) => set.contains(namespace),
        }
    }

    /// One list-watch scope per namespace, or `None` for all namespaces.
    pub fn watch_scopes(&self) -> Vec<Option<String>> {
        match self {
            Scope::Cluster => vec![None],
            Scope::Namespaces(set) => set.iter().cloned().map(Some).collect(),
        }
    }

    /// APIs that together cover the scope: `Api::all`, or one `Api::namespaced` per namespace
    /// (a namespaced Role cannot list across namespaces).
    pub fn apis<K>(&self, client: &Client) -> Vec<Api<K>>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        match self {
            Scope::Cluster => vec![Api::all(client.clone())],
            Scope::Namespaces(set) => set
                .iter()
                .map(|n| Api::namespaced(client.clone(), n))
                .collect(),
        }
    }

    /// Human-readable, for status messages.
    pub fn describe(&self) -> String {
        match self {
            Scope::Cluster => "all namespaces".into(),
            Scope::Namespaces(set) => set.iter().cloned().collect::<Vec<_>>().join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;

    use super::*;

    #[test]
    fn blanks_and_duplicates_collapse_and_nothing_means_cluster() {
        assert_eq!(Scope::from_namespaces([" ", ""]), Scope::Cluster);
        let s = Scope::from_namespaces(["b", " a ", "b"]);
        assert_eq!(s.watch_scopes(), [Some("a".into()), Some("b".into())]);
        assert!(s.contains("a") && !s.contains("c"));
        assert_eq!(s.describe(), "a, b");
        assert_eq!(Scope::Cluster.watch_scopes(), [None]);
        assert!(Scope::Cluster.contains("anything"));
    }

    #[tokio::test]
    async fn apis_cover_the_scope() {
        let (svc, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = Client::new(svc, "default");
        let urls = |s: &Scope| {
            s.apis::<ConfigMap>(&client)
                .iter()
                .map(|a| a.resource_url().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(urls(&Scope::Cluster), ["/api/v1/configmaps"]);
        assert_eq!(
            urls(&Scope::from_namespaces(["b", "a"])),
            [
                "/api/v1/namespaces/a/configmaps",
                "/api/v1/namespaces/b/configmaps"
            ]
        );
    }
}
