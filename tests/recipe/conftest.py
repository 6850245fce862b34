import pytest


@pytest.fixture(scope="module", autouse=True)
def _plain_cpu_search():
    # The recipe's tests exercise the recipe on the search path CPU users get; the Triton kernel
    # (which the top-level conftest runs in the interpreter) is proven by tests/ops, and would
    # take seconds per lookup here. Module scope: module-scoped fixtures (a trained run) need it too.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        yield
