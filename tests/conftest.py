"""Suite-wide settings.

Tests use tiny models, for which intra-op threads cost more in synchronisation than they gain
(a tiny training step measured 0.036 s on 1 thread against 0.49 s on 2 threads of a busy 2-core
machine), so every test runs torch on one thread. Benchmarks choose their own thread counts.
"""

import pytest
import torch

torch.set_num_threads(1)

from tests.vllm_server import release_vllm_server, vllm_server  # noqa: E402, F401  (one vLLM server, for every test that asks)

VLLM_GROUP = "vllm-server"
VLLM_MODULES = (
    "tests/generation/test_vllm_engine.py",
    "tests/judges/test_vllm_server.py",
    "tests/experiments/test_vllm_experiments.py",
)
# How many collected tests still have to use the vLLM server in this process; the last one stops it.
_VLLM_USERS_LEFT = {"count": 0}


def _uses_vllm(item: pytest.Item) -> bool:
    return "vllm_server" in getattr(item, "fixturenames", ())


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Modules that hold end-to-end (``slow``) tests run first, so a parallel run does not end waiting on one of
    them; the tests that use the vLLM server run one after another, from where the first of them stood."""
    slow_modules = {_module(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: _module(item) not in slow_modules)  # stable: the order within each part is kept
    users = [item for item in items if _uses_vllm(item)]
    if users:
        first = items.index(users[0])
        others = [item for item in items if not _uses_vllm(item)]
        items[:] = others[:first] + users + others[first:]
    _VLLM_USERS_LEFT["count"] = len(users)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (``make test`` runs ``-n 2``), a module's tests go to one worker in their order, so
    module-scoped servers and fixtures are set up once; the modules of the vLLM tests share one worker, so one
    server start serves them all. (The scheduler groups by node id: the controller does not collect, so it
    cannot see fixtures.)"""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # modules are handed out in the collection's order (slow ones first)

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return VLLM_GROUP if module in VLLM_MODULES else module

    return ModuleScheduling(config, log)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop the vLLM server once the last test that uses it has run (after its fixtures' teardown)."""
    if _uses_vllm(item):
        _VLLM_USERS_LEFT["count"] -= 1
        if _VLLM_USERS_LEFT["count"] <= 0:
            release_vllm_server()


def pytest_sessionfinish(session, exitstatus):
    release_vllm_server()
