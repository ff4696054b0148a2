//! The `VlmCaptioner` operator: CRD types, pure builders of the owned objects, and the
//! reconcile loop that applies them with server-side apply.

pub mod builders;
pub mod context;
pub mod controller;
pub mod crd;
pub mod download;
pub mod error;
pub mod http;
pub mod inputs;
pub mod kstatus;
pub mod leader;
pub mod metrics;
pub mod overlay;
pub mod probe;
pub mod reconcile;
pub mod scope;
pub mod status;
pub mod telemetry;
pub mod wiring;

pub use context::Context;
pub use crd::{VlmCaptioner, VlmCaptionerSpec, VlmCaptionerStatus};
pub use error::{Error, Result};
pub use reconcile::{error_policy, reconcile};

#[cfg(test)]
mod test_support;
