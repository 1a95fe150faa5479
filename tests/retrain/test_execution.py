"""Numbers do not depend on how retraining is spread out: group size, workers, backend."""

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.retrain import Execution, PbrfResponse, SubsetsResponse, WarmResponse


def _network_stages(trained, execution, group_size):
    test = trained.problem.test.subset(torch.arange(6))
    removed = torch.tensor([3, 50, 400, 401, 1000])
    warm = WarmResponse(epochs=1, group_size=group_size).compute(trained, test, removed, execution)
    pbrf = PbrfResponse(damping=0.01, group_size=group_size).compute(
        trained, test, removed, execution
    )
    subsets = SubsetsResponse(alphas=[0.9], subsets=3, group_size=group_size).compute(
        trained, test, execution
    )
    return warm.deltas, pbrf.deltas, subsets.per_seed


@pytest.mark.slow
def test_network_stages_do_not_depend_on_group_size_workers_or_backend(trained_problems):
    distributed = pytest.importorskip("distributed")
    trained = trained_problems("digits-mlp")
    reference = _network_stages(trained, Execution(workers=1), group_size=64)
    runs = {
        "groups of 2": _network_stages(trained, Execution(workers=1), group_size=2),
        "2 loky workers": _network_stages(
            trained, Execution(workers=2, backend="loky"), group_size=2
        ),
    }
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        execution = Execution(workers=2, backend="dask", scheduler=cluster.scheduler_address)
        runs["dask LocalCluster"] = _network_stages(trained, execution, group_size=2)
    for name, (warm, pbrf, subsets) in runs.items():
        torch.testing.assert_close(warm, reference[0], rtol=1e-10, atol=1e-15, msg=name)
        torch.testing.assert_close(pbrf, reference[1], rtol=1e-10, atol=1e-15, msg=name)
        torch.testing.assert_close(subsets, reference[2], rtol=1e-10, atol=1e-15, msg=name)


def test_dask_settings_are_checked():
    with pytest.raises(FidelityError, match="dask backend needs a scheduler address"):
        Execution(backend="dask")
    with pytest.raises(FidelityError, match="only used by the dask backend"):
        Execution(backend="loky", scheduler="tcp://127.0.0.1:8786")


def test_unreachable_scheduler_is_a_clear_error():
    pytest.importorskip("distributed")
    execution = Execution(workers=2, backend="dask", scheduler="tcp://127.0.0.1:9")
    with (
        pytest.raises(FidelityError, match="cannot reach the dask scheduler"),
        execution.parallel(),
    ):
        pass


@pytest.mark.slow
def test_dask_tasks_carry_references_and_the_problem_is_sent_once(trained_problems, monkeypatch):
    # Each task's own bytes are counted where the engine builds it (in this thread: counting
    # inside Client.submit ran cloudpickle on the client's event loop, and the test hung once
    # there), so what joblib's dask backend adds on the way out is not counted; the trained
    # problem (about 0.4 MB for digits-mlp) and pbrf's Gauss-Newton factor
    # (about 46 MB) are scattered once per session, not carried by each task.
    distributed = pytest.importorskip("distributed")
    cloudpickle = pytest.importorskip("cloudpickle")
    import joblib

    from fidelity.core.problem import TrainedProblem
    from fidelity.retrain import execution as execution_module

    trained = trained_problems("digits-mlp")
    task_bytes: list[int] = []
    scattered: list[str] = []
    scatter = distributed.Client.scatter

    def counting_delayed(function):
        def record(*args, **kwargs):
            task_bytes.append(len(cloudpickle.dumps((function, args, kwargs))))
            return joblib.delayed(function)(*args, **kwargs)

        return record

    def counting_scatter(self, data, *args, **kwargs):
        scattered.append(type(data).__name__)
        return scatter(self, data, *args, **kwargs)

    monkeypatch.setattr(distributed.Client, "scatter", counting_scatter)
    reference = _network_stages(trained, Execution(workers=1), group_size=64)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        execution = Execution(workers=2, backend="dask", scheduler=cluster.scheduler_address)
        with execution.connected(), monkeypatch.context() as patch:
            patch.setattr(execution_module, "delayed", counting_delayed)
            shared = _network_stages(trained, execution, group_size=2)
    problem_bytes = len(cloudpickle.dumps(trained))
    assert problem_bytes > 100_000
    # warm, pbrf and subsets: 3 + 3 + 2 groups
    assert len(task_bytes) == 8, task_bytes
    assert max(task_bytes) < 20_000, task_bytes
    # one copy of the problem for all three stages; warm's plan, pbrf's factor and the
    # subsets' masks once each
    assert scattered == [TrainedProblem.__name__, "RetrainPlan", "Tensor", "Tensor"]
    for got, expected in zip(shared, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-15)
