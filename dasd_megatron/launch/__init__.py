"""Launching recipes: where a job's processes run, the commands they run, and nemo-run submission.

| module | holds |
| --- | --- |
| `spec` | `Recipe` (what a recipe function returns), overrides for it |
| `placement` | `TrainerResources`, `RolloutPlacement` (colocated / separate / builtin rollout servers) |
| `checks` | `resolve_recipe`, `check_recipe` (everything checked before submission), the run folder's files |
| `command` | job kinds (`train`, `smoke`), the torchrun and rollout-node commands |
| `environment` | the job's environment variables (NCCL/gloo, ports, run folder) |
| `executors` | nemo-run `LocalExecutor` / `SlurmExecutor` (heterogeneous for separate rollout nodes), `SlurmSettings` |
| `submit` | `submit()`: check, write the run folder, dry-run or run |
| `rendezvous`, `rollout_node` | how rollout servers are started on their nodes and found by the trainer |
| `cli` | `dasd submit` (`add_submit_parser`) |

Only `submit` and `executors` import nemo-run, and only when called.
"""

from dasd_megatron.launch.checks import check_recipe, resolve_recipe, write_run_files
from dasd_megatron.launch.executors import SlurmSettings
from dasd_megatron.launch.placement import RolloutPlacement, TrainerResources
from dasd_megatron.launch.spec import Recipe
from dasd_megatron.launch.submit import Submission, submit

__all__ = ["Recipe", "RolloutPlacement", "SlurmSettings", "Submission", "TrainerResources", "check_recipe",
           "resolve_recipe", "submit", "write_run_files"]
