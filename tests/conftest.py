import os
import tempfile

# Tests never reach the hub (a look-up otherwise hangs ~46 s before failing) and use the smoke profile.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("DEME_PROFILE", "smoke")
# Scan indexes of image-caption folders (deme.sd.ImageCaptionFolder) go to a temporary folder, not runs/.
os.environ.setdefault("DEME_INDEX_DIR", tempfile.mkdtemp(prefix="deme_index_"))
