import atexit
import os
import shutil
import tempfile

# Tests never reach the hub (a look-up otherwise hangs ~46 s before failing) and use the smoke profile.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("DEME_PROFILE", "smoke")
# A private, empty Hugging Face cache for the session, set before anything imports huggingface_hub (it reads
# HF_HOME once): tests write stand-in models under real hub ids into it (tests/test_rehearse.py), which must
# never land in a user's own cache.
os.environ.pop("HF_HUB_CACHE", None)
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="deme_tests_hf_")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)
# Under pytest-xdist every worker, and every process it starts, uses one CPU thread: torch's OpenMP threads
# spin-wait, so two workers with two threads each on two cores slow each other down many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Scan indexes of image-caption folders (deme.imagecaptions.ImageCaptionFolder) go to a temporary folder, not runs/.
if "DEME_INDEX_DIR" not in os.environ:
    os.environ["DEME_INDEX_DIR"] = tempfile.mkdtemp(prefix="deme_index_")
    atexit.register(shutil.rmtree, os.environ["DEME_INDEX_DIR"], True)


def pytest_collection_modifyitems(session, config, items):
    """The slowest tests first (stable otherwise): `make test` hands whole files to pytest-xdist's workers in this
    order (`-n auto --dist loadfile --no-loadscope-reorder`), so the two files of minutes-long tests (the notebooks,
    the rehearsals) start at once on two workers instead of one of them ending the run alone."""
    items[:] = sorted(items, key=lambda item: item.get_closest_marker("slow") is None)
