//! Condition types and reasons (Events use the same reasons): the vocabulary users and tests read.

/// Condition type: the config resolved and validated.
pub const CONFIG_VALID: &str = "ConfigValid";
/// Condition type and Event reason: every pod runs.
pub const RUNNING: &str = "Running";
/// Condition type: the group is being recreated.
pub const RESTARTING: &str = "Restarting";
/// Condition type and Event reason: suspended (no pods).
pub const SUSPENDED: &str = "Suspended";
/// Condition type and Event reason: every pod exited 0.
pub const SUCCEEDED: &str = "Succeeded";
/// Condition type: the run failed (the reason says why).
pub const FAILED: &str = "Failed";

/// ConfigValid=True.
pub const CONFIG_RESOLVED: &str = "ConfigResolved";
/// ConfigValid=False, Failed=True, and a Warning Event: the loader's message names the key.
pub const INVALID_CONFIG: &str = "InvalidConfig";
/// Event: pods of an attempt created.
pub const CREATED_GROUP: &str = "CreatedGroup";
/// Running=True.
pub const ALL_PODS_RUNNING: &str = "AllPodsRunning";
/// Restarting=True and a Warning Event: a pod failed (retryable exit code, eviction, node loss).
pub const POD_FAILED: &str = "PodFailed";
/// Restarting=True and a Warning Event: a pod of a running group was deleted or vanished.
pub const POD_DELETED: &str = "PodDeleted";
/// Restarting=True: pods of an earlier attempt are still going away.
pub const WAITING_FOR_OLD_PODS: &str = "WaitingForOldPods";
/// Failed=True and a Warning Event: a failure after backoffLimit restarts.
pub const BACKOFF_LIMIT_EXCEEDED: &str = "BackoffLimitExceeded";
/// Failed=True and a Warning Event: exit code 64 (invalid config) or 65 (invalid data).
pub const PERMANENT_ERROR: &str = "PermanentError";
/// Failed=True and a Warning Event: activeDeadlineSeconds passed.
pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
/// Suspended=False and a Normal Event: runPolicy.suspend went back to false.
pub const RESUMED: &str = "Resumed";
/// Normal Event: ttlSecondsAfterFinished passed; the resource is deleted.
pub const TTL_EXPIRED: &str = "TTLExpired";
/// Condition type (gang scheduling only): the group's PodGroup exists.
pub const POD_GROUP_CREATED: &str = "PodGroupCreated";
/// PodGroupCreated=True and a Normal Event: the PodGroup was applied before the pods.
pub const POD_GROUP_APPLIED: &str = "PodGroupApplied";
/// PodGroupCreated=False and a Warning Event: the PodGroup CRD is not installed; no pods.
pub const POD_GROUP_UNAVAILABLE: &str = "PodGroupUnavailable";
/// PodGroupCreated=False and a Warning Event: the operator's RBAC does not allow PodGroups; no pods.
pub const POD_GROUP_FORBIDDEN: &str = "PodGroupForbidden";
