"""Shared test setup: offline, and one cache folder for the whole session (built-in models are built once)."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# A fixed thread count: runs would otherwise take the cores other jobs leave free (dreamlora.threads), and tests
# that compare two runs' bytes would depend on what else the machine runs. torch's own default is the same count.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    previous = os.environ.get("DREAMLORA_CACHE")
    path = tmp_path_factory.mktemp("dreamlora-cache")
    os.environ["DREAMLORA_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("DREAMLORA_CACHE", None)
    else:
        os.environ["DREAMLORA_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_sd(session_cache):
    from dreamlora.models import load_base_model

    return load_base_model("builtin:tiny-sd")
