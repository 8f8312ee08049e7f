import os
import tempfile

import pytest
import torch

# The suite runs the blocking in-memory compile (which kernel serves a call must not depend on timing), and never
# touches the user's kernel store: tests of the store and its background builder set their own mode and directory.
os.environ["NORMZOO_COMPILE"] = "sync"
os.environ["NORMZOO_KERNEL_DIR"] = tempfile.mkdtemp(prefix="normzoo-test-kernels-")
# Nor does it build the C++ autograd node (~30 s of gcc per store): tests/test_native.py, marked `native`, does.
os.environ["NORMZOO_NATIVE"] = "0"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    return (f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"TORCHINDUCTOR_CACHE_DIR={os.environ.get('TORCHINDUCTOR_CACHE_DIR', '(default)')}, "
            f"NORMZOO_COMPILE={os.environ['NORMZOO_COMPILE']}")
