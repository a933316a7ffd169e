import pytest
import torch

# Tiny-model folders: intra-op threads only add synchronisation overhead there (seconds per step on a busy
# 2-core box); the setting is restored after each module so no other test inherits it.
SINGLE_THREAD_DIRS = {"finetune", "optim", "marl"}


@pytest.fixture(autouse=True, scope="module")
def one_thread_for_tiny_models(request):
    if request.path.parent.name not in SINGLE_THREAD_DIRS:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
