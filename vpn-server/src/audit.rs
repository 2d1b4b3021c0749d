//! The audit trail's writer: every record is logged under the `floto::audit` target and
//! appended to the registry (rows are never updated or deleted). A failed write is logged,
//! never fatal to the action that already happened.

use std::sync::Arc;

use tracing::{info, warn};

use floto_registry::{AuditRecord, Registry, StoreError};

/// Writes audit records.
#[derive(Clone)]
pub struct Auditor {
    registry: Arc<dyn Registry>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor").finish_non_exhaustive()
    }
}

impl Auditor {
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        Self { registry }
    }

    /// Logs and stores one record; a failed write is logged and otherwise ignored (the
    /// action it records already happened).
    pub async fn record(&self, record: AuditRecord) {
        if let Err(e) = self.try_record(record).await {
            warn!(error = %e, "could not write the audit record");
        }
    }

    /// Logs and stores one record, or says why it could not be stored: for actions that
    /// must not happen without their record (a broker session).
    pub async fn try_record(&self, record: AuditRecord) -> Result<(), StoreError> {
        info!(
            target: "floto::audit",
            actor = %record.actor,
            action = %record.action,
            device = ?record.device.map(|d| d.to_string()),
            detail = %record.detail,
            "audit"
        );
        self.registry.append_audit(record).await
    }
}
