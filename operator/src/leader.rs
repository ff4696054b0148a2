//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it: the holder renews
//! `renewTime` every few seconds; another replica takes the Lease over only once
//! `renewTime + leaseDurationSeconds` has passed. Every write carries the `resourceVersion` it
//! read, so two replicas racing for an expired Lease cannot both win (one gets 409 Conflict).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;
use tracing::{info, warn};

pub const LEASE_NAME: &str = "vlm-operator-leader";
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// Give up leading when renewals have failed this long: stop before another replica may take
/// over (`LEASE_DURATION`), so two leaders never overlap.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaseLock {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration: LEASE_DURATION,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One step: create the Lease, renew ours, or take over an expired one. `Ok(true)` while
    /// this replica leads; `Ok(false)` when another holds it or won a race.
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let duration_s = i32::try_from(self.duration.as_secs()).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_s),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() != Some(self.identity.as_str()) {
            if holder.is_some() && !expired(spec, now) {
                return Ok(false);
            }
            info!(previous = ?holder, identity = %self.identity, "taking over the leader Lease");
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.lease_duration_seconds = Some(duration_s);
        spec.renew_time = Some(MicroTime(now));
        // PUT with the resourceVersion just read: optimistic concurrency.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// On shutdown: hand the Lease over at once instead of making the standby wait it out.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Polls until this replica leads.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew(Timestamp::now()).await {
                Ok(true) => {
                    info!(identity = %self.identity, "acquired the leader Lease");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election: acquiring the Lease"),
            }
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }

    /// Renews every `RENEW_EVERY` and returns when leadership is lost: another holder, or no
    /// successful renewal for `RENEW_DEADLINE`.
    pub async fn hold(&self) {
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match self.try_acquire_or_renew(Timestamp::now()).await {
                Ok(true) => last_renewed = Instant::now(),
                Ok(false) => {
                    warn!(identity = %self.identity, "lost the leader Lease to another replica");
                    return;
                }
                Err(e) => warn!(error = %e, "leader election: renewing the Lease"),
            }
            if last_renewed.elapsed() >= RENEW_DEADLINE {
                warn!(identity = %self.identity, "could not renew the leader Lease in time");
                return;
            }
        }
    }
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(MicroTime(renewed)) = spec.renew_time else {
        return true;
    };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    match renewed.checked_add(duration) {
        Ok(until) => until < now,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn lease(holder: &str, renewed: i64, rv: &str) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": LEASE_NAME, "namespace": "ops", "resourceVersion": rv},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                "renewTime": MicroTime(at(renewed)), "acquireTime": MicroTime(at(renewed - 100)),
                "leaseTransitions": 3},
        })
    }

    /// Plays `replies` in order and returns the (method, path, body) of each request.
    async fn run(
        replies: Vec<(StatusCode, Value)>,
        now: Timestamp,
    ) -> (Result<bool, kube::Error>, Vec<(Method, String, Value)>) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let lock = LeaseLock::new(Client::new(svc, "ops"), "ops", LEASE_NAME, "me");
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (code, reply) in replies {
                let Some((req, send)) = handle.next_request().await else {
                    break;
                };
                let method = req.method().clone();
                let path = req.uri().path().to_string();
                let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
                seen.push((
                    method,
                    path,
                    serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                ));
                let body = Body::from(serde_json::to_vec(&reply).unwrap_or_default());
                if let Ok(r) = Response::builder().status(code).body(body) {
                    send.send_response(r);
                }
            }
            seen
        });
        let result = lock.try_acquire_or_renew(now).await;
        drop(lock);
        (result, server.await.unwrap_or_default())
    }

    fn status(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": reason})
    }

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/vlm-operator-leader";

    #[tokio::test]
    async fn acquires_a_free_lease_by_creating_it() {
        let (res, seen) = run(
            vec![
                (StatusCode::NOT_FOUND, status(404, "NotFound")),
                (StatusCode::CREATED, lease("me", NOW, "1")),
            ],
            at(NOW),
        )
        .await;
        assert!(res.expect("no error"));
        assert_eq!(seen[0].0, Method::GET);
        assert_eq!(seen[1].0, Method::POST);
        assert_eq!(seen[1].2["spec"]["holderIdentity"], "me");
        assert_eq!(seen[1].2["spec"]["leaseDurationSeconds"], 15);
    }

    #[tokio::test]
    async fn does_not_touch_a_lease_held_by_another_unexpired_holder() {
        let (res, seen) = run(
            vec![(StatusCode::OK, lease("other", NOW - 10, "7"))],
            at(NOW),
        )
        .await;
        assert!(!res.expect("no error"));
        assert_eq!(seen.len(), 1, "only the read: {seen:?}");
    }

    #[tokio::test]
    async fn takes_over_an_expired_lease_with_its_resource_version() {
        let (res, seen) = run(
            vec![
                (StatusCode::OK, lease("other", NOW - 16, "7")),
                (StatusCode::OK, lease("me", NOW, "8")),
            ],
            at(NOW),
        )
        .await;
        assert!(res.expect("no error"));
        let (method, path, body) = &seen[1];
        assert_eq!((method, path.as_str()), (&Method::PUT, PATH));
        assert_eq!(body["metadata"]["resourceVersion"], "7");
        assert_eq!(body["spec"]["holderIdentity"], "me");
        assert_eq!(body["spec"]["leaseTransitions"], 4);
        assert_eq!(body["spec"]["renewTime"], json!(MicroTime(at(NOW))));
        assert_eq!(body["spec"]["acquireTime"], json!(MicroTime(at(NOW))));
    }

    #[tokio::test]
    async fn renews_its_own_lease_without_a_transition() {
        let (res, seen) = run(
            vec![
                (StatusCode::OK, lease("me", NOW - 5, "7")),
                (StatusCode::OK, lease("me", NOW, "8")),
            ],
            at(NOW),
        )
        .await;
        assert!(res.expect("no error"));
        let body = &seen[1].2;
        assert_eq!(seen[1].0, Method::PUT);
        assert_eq!(body["spec"]["leaseTransitions"], 3);
        assert_eq!(body["spec"]["renewTime"], json!(MicroTime(at(NOW))));
        assert_eq!(
            body["spec"]["acquireTime"],
            json!(MicroTime(at(NOW - 105))),
            "unchanged"
        );
    }

    #[tokio::test]
    async fn losing_the_race_for_an_expired_lease_is_not_leading() {
        let (res, _) = run(
            vec![
                (StatusCode::OK, lease("other", NOW - 60, "7")),
                (StatusCode::CONFLICT, status(409, "Conflict")),
            ],
            at(NOW),
        )
        .await;
        assert!(!res.expect("a conflict is not an error"));
    }

    #[tokio::test]
    async fn a_released_lease_is_free() {
        let mut free = lease("", NOW - 1, "7");
        free["spec"]["holderIdentity"] = Value::Null;
        let (res, seen) = run(
            vec![
                (StatusCode::OK, free),
                (StatusCode::OK, lease("me", NOW, "8")),
            ],
            at(NOW),
        )
        .await;
        assert!(res.expect("no error"));
        assert_eq!(seen[1].2["spec"]["holderIdentity"], "me");
    }
}
