import pytest
import torch
import torch.distributed as dist

from dasd_megatron.testing.distributed import run_distributed


def _allreduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail(rank, world_size):
    if rank == 1:
        raise ValueError("rank one broke")
    return rank


def test_results_by_rank():
    assert run_distributed(_allreduce, 2) == [3.0, 3.0]


def test_failure_reports_rank_traceback():
    with pytest.raises(AssertionError, match="rank 1: ValueError: rank one broke"):
        run_distributed(_fail, 2)
