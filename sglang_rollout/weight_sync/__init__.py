"""Weight sync from the trainer to the rollout servers: one interface (`WeightSync`), three transports."""

from sglang_rollout.weight_sync.buckets import BucketPlan, PlanMismatch, TensorSpec
from sglang_rollout.weight_sync.sync import SyncReport, WeightSync, WeightSyncError, drain
from sglang_rollout.weight_sync.transports import DiskTransport, DistributedTransport, TensorTransport, Transport

__all__ = [
    "WeightSync", "SyncReport", "WeightSyncError", "drain",
    "Transport", "TensorTransport", "DistributedTransport", "DiskTransport",
    "BucketPlan", "TensorSpec", "PlanMismatch",
]
