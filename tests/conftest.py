import os

# Tests never reach the hub (a look-up otherwise hangs ~46 s before failing) and use the smoke profile.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("DEME_PROFILE", "smoke")
