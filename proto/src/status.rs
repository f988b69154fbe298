//! Protocol conditions carried in gRPC statuses, made and recognised in one
//! place: a worker matches a typed marker, never the message text.

use tonic::metadata::MetadataValue;
use tonic::Status;

/// Metadata key on a status that says the job has ended.
const JOB_OVER_KEY: &str = "kvd-job-over";

/// The status of any call made after the job ended (done, paused, stopped
/// or failed), naming why: `FAILED_PRECONDITION` with the job-over marker.
pub fn job_over(reason: &str) -> Status {
    let mut s = Status::failed_precondition(format!("the job is over: {reason}"));
    s.metadata_mut()
        .insert(JOB_OVER_KEY, MetadataValue::from_static("1"));
    s
}

/// Whether `s` says the job has ended (made by [`job_over`]).
pub fn is_job_over(s: &Status) -> bool {
    s.code() == tonic::Code::FailedPrecondition && s.metadata().get(JOB_OVER_KEY).is_some()
}

/// Metadata key on a status that says the coordinator keeps no checkpoints.
const NO_CHECKPOINTS_KEY: &str = "kvd-no-checkpoints";

/// The reply to a checkpoint call when the coordinator has no checkpoint
/// URL: `FAILED_PRECONDITION` with the no-checkpoints marker (the worker
/// then skips checkpoints quietly).
pub fn no_checkpoints() -> Status {
    let mut s = Status::failed_precondition("the coordinator has no checkpoint_url configured");
    s.metadata_mut()
        .insert(NO_CHECKPOINTS_KEY, MetadataValue::from_static("1"));
    s
}

/// Whether `s` says the coordinator keeps no checkpoints (made by [`no_checkpoints`]).
pub fn is_no_checkpoints(s: &Status) -> bool {
    s.code() == tonic::Code::FailedPrecondition && s.metadata().get(NO_CHECKPOINTS_KEY).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_not_the_message_decides() {
        let s = job_over("done");
        assert!(is_job_over(&s));
        assert!(s.message().contains("done"));
        // The same words without the marker, or the marker on another code, are not it.
        assert!(!is_job_over(&Status::failed_precondition(
            "the job is over: done"
        )));
        let mut other = Status::unavailable("x");
        other
            .metadata_mut()
            .insert(JOB_OVER_KEY, MetadataValue::from_static("1"));
        assert!(!is_job_over(&other));
    }

    #[test]
    fn no_checkpoints_is_its_own_marker() {
        let s = no_checkpoints();
        assert!(is_no_checkpoints(&s) && !is_job_over(&s));
        assert!(!is_no_checkpoints(&job_over("done")));
        assert!(!is_no_checkpoints(&Status::failed_precondition(
            "the coordinator has no checkpoint_url configured"
        )));
    }
}
