"""The project's errors, in one place. Each says what is missing or wrong and what to do about it; the
loaders, the merge and the image-caption reader raise them, notebooks and the CLI let them through."""


class DataMissingError(FileNotFoundError):
    """A dataset is not on disk and cannot be fetched; the message says how to provide it."""


class WeightsMissingError(FileNotFoundError):
    """Pretrained weights are neither on disk nor reachable; the message says what to provide."""


class CorruptImageError(ValueError):
    """An image file that cannot be decoded."""


class MergeMismatchError(ValueError):
    """Checkpoints that cannot be merged: different keys or shapes."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""
