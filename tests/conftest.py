import _ref
import pytest


# The suite runs in pytest-xdist worker processes (`-n 2` in pyproject's addopts), so the parity
# errors a test measures (`_ref.ERRORS`, in the worker) travel to the controller in the test's
# report, as user properties, and are collected there for the summary.
_PARITY: dict[str, list[tuple[str, float, float]]] = {}


@pytest.fixture(autouse=True)
def _parity_errors_into_the_report(request):
    start = len(_ref.ERRORS)
    yield
    for case, rel, mx in _ref.ERRORS[start:]:
        request.node.user_properties.append(("parity", (case, rel, mx)))


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        found = [tuple(v) for k, v in report.user_properties if k == "parity"]
        if found:
            _PARITY[report.nodeid] = found


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    """Free the session's compiled kernels while the worker still counts as running. Once a
    pytest-xdist worker reports its session finished, execnet gives it 5 s to exit and then sends
    it a SIGINT; pytest's final garbage collection, where jax frees hundreds of executables, took
    longer, so the SIGINT landed in jax's gc callback and ended the run with two "Exception
    ignored ... KeyboardInterrupt" warnings. Nothing a test checks is affected."""
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def pytest_terminal_summary(terminalreporter):
    """Print the parity errors measured in this run (they go into the issue notes)."""
    errors = [e for found in _PARITY.values() for e in found]
    if not errors:
        return
    tr = terminalreporter
    tr.section("parity against diffusers (fp32): relative L2 / max abs")
    worst_rel = max(e[1] for e in errors)
    worst_abs = max(e[2] for e in errors)
    for case, rel, mx in errors:
        tr.write_line(f"{case:60s} rel {rel:.2e}  max {mx:.2e}")
    tr.write_line(f"{'WORST':60s} rel {worst_rel:.2e}  max {worst_abs:.2e}")


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode against a Hub that refuses connections: the endpoint is pointed at a closed
    local port (real connection errors, no traffic leaves the machine)."""
    import socket

    import huggingface_hub.constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
