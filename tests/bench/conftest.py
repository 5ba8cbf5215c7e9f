import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The suites run tiny models, which gain nothing from a second thread and lose much to a busy
    neighbour; as `--quick` does, use one thread, then give the session back its count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
